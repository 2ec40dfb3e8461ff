"""End to end: dcm4chee rows -> client.py -> the documents the service receives."""

from __future__ import annotations

import datetime
import threading
import time

from conftest import (
    API_KEY,
    CENTER,
    LONG_AGO,
    create_database,
    drop_database,
    write_configs,
)

from dicom_indexer.cli import main
from dicom_indexer.commands import INITIAL_LEAD_PAGES
from dicom_indexer.document import DOCUMENT_KEYS


def test_initial_sends_every_study_once_with_the_right_fields(pacs, service, configs):
    pks = pacs.add_studies(3000)
    pacs.add_patient("SIN^ESTUDIOS", "99999999-9")  # a patient without studies sends nothing

    assert main(["initial", *configs]) == 0

    assert service.study_pks() == sorted(pks)
    assert len(service.received) == 3000
    first = next(doc for doc in service.documents if doc["study_pk"] == pks[0])
    patient = pacs.query("SELECT pk FROM patient WHERE pat_name = 'PACIENTE^NUMERO0'")[0]["pk"]
    assert first == {
        "patient_pk": patient,
        "patient_id": "10000000-0",
        "patient_name": "PACIENTE^NUMERO0",
        "study_pk": pks[0],
        "study_iuid": first["study_iuid"],
        "study_datetime": "2019-03-04 10:00:00",
        "study_description": "TC CEREBRO",
        "study_modality": "CT",
        "study_series": 1,
        "study_instances": 10,
        "center": CENTER,
    }
    assert list(first) == list(DOCUMENT_KEYS)
    assert pacs.statuses() == {"sent": 3000}
    # The initial load is finished: its bookkeeping row is gone.
    assert not pacs.query("SELECT * FROM study_service WHERE study_pk = -1")


def test_http_request_carries_key_and_json_content_type(pacs, service, configs):
    pacs.add_study(pacs.add_patient())
    assert main(["initial", *configs]) == 0
    request = service.received[0]
    assert request.method == "POST"
    assert request.path == "/api/v1/register"
    assert request.headers["X-Api-Key"] == API_KEY
    assert request.headers["Content-Type"] == "application/json"


def test_tick_sends_new_and_grown_studies_then_nothing(pacs, service, configs):
    patient = pacs.add_patient()
    old = [pacs.add_study(patient, updated_time=LONG_AGO) for _ in range(5)]
    assert main(["initial", *configs]) == 0
    assert service.study_pks() == old
    service.clear()

    new = pacs.add_study(patient)
    pacs.store_series(old[1])  # more images arrive for an old study
    assert main(configs) == 0
    assert service.study_pks() == sorted([new, old[1]])
    grown = next(d for d in service.documents if d["study_pk"] == old[1])
    assert grown["study_series"] == 2
    assert grown["study_instances"] == 15
    assert grown["study_modality"] == "CT\\SR"
    service.clear()

    assert main(configs) == 0
    assert service.received == []


def test_rewrite_within_the_same_second_is_sent_again(pacs, service, configs):
    """updated_time has second precision: the counts tell the rewrite apart."""
    patient = pacs.add_patient()
    stamp = datetime.datetime.now().replace(microsecond=0)
    study = pacs.add_study(patient, updated_time=stamp, num_instances=1)
    assert main(configs) == 0
    pacs.execute("UPDATE study SET num_instances = 2 WHERE pk = %s", (study,))  # same updated_time
    assert main(configs) == 0
    assert [d["study_instances"] for d in service.documents] == [1, 2]


def test_row_visible_late_with_lower_pk_and_older_updated_time_is_not_missed(
    pacs, service, configs
):
    patient = pacs.add_patient()
    now = datetime.datetime.now().replace(microsecond=0)
    first = pacs.add_study(patient, updated_time=now)
    pacs.execute("UPDATE study SET pk = 500 WHERE pk = %s", (first,))
    assert main(configs) == 0
    # Committed after that tick, with a lower pk and an updated_time 2 minutes
    # before what the tick saw: its transaction started earlier.
    late = pacs.add_study(patient, updated_time=now - datetime.timedelta(minutes=2))
    pacs.execute("UPDATE study SET pk = 400 WHERE pk = %s", (late,))
    assert main(configs) == 0
    assert service.study_pks() == [400, 500]


def test_future_updated_time_does_not_hide_other_changes(pacs, service, configs):
    patient = pacs.add_patient()
    future = pacs.add_study(patient, updated_time=datetime.datetime(2035, 1, 1))
    assert main(configs) == 0
    later = pacs.add_study(patient)
    pacs.execute(
        "UPDATE study SET updated_time = NOW() - INTERVAL '1' SECOND WHERE pk = %s", (later,)
    )
    assert main(configs) == 0
    assert main(configs) == 0
    assert service.study_pks() == [future, later]


def test_orphan_study_and_nulls_and_zero_dates(pacs, service, configs):
    orphan = pacs.add_study(None, desc=None, mods=None, study_datetime=None)
    if pacs.postgresql:  # no zero dates in PostgreSQL; foreign keys off as a superuser
        dangling = pacs.add_study(None, study_datetime=None)
        pacs.execute("SET session_replication_role = replica")
        pacs.execute("UPDATE study SET patient_fk = 424242 WHERE pk = %s", (dangling,))
        pacs.execute("SET session_replication_role = DEFAULT")
    else:
        pacs.execute("SET SESSION sql_mode = ''")
        dangling = pacs.add_study(None, study_datetime="0000-00-00 00:00:00")
        pacs.execute("SET FOREIGN_KEY_CHECKS = 0")
        pacs.execute("UPDATE study SET patient_fk = 424242 WHERE pk = %s", (dangling,))
        pacs.execute("SET FOREIGN_KEY_CHECKS = 1")
    assert main(["initial", *configs]) == 0
    docs = {d["study_pk"]: d for d in service.documents}
    assert docs[orphan]["patient_pk"] is None
    assert docs[orphan]["patient_name"] is None
    assert docs[orphan]["study_description"] is None
    assert docs[orphan]["study_modality"] is None
    assert docs[orphan]["study_datetime"] is None
    assert docs[dangling]["patient_pk"] is None
    assert docs[dangling]["patient_id"] is None
    assert docs[dangling]["study_datetime"] is None


NAMES = [
    "MUÑOZ^JOSÉ^ÁNGEL",
    "O'HIGGINS^BERNARDO",
    'DE "LA" FUENTE^MARÍA',
    "PEÑA\\BACKSLASH^ÑANDÚ",
    "CONTROL\x01CHAR^X\tTAB",
]


def _round_trip_names(charset, service, tmp_path):
    name = create_database(charset)
    try:
        from conftest import PacsDb

        db = PacsDb(name)
        for pn in NAMES:
            db.add_study(db.add_patient(pn, "12.345.678-K"), desc=f"DESCRIPCIÓN {pn}")
        args = write_configs(tmp_path, name, service.url)
        assert main(["initial", *args]) == 0
        db.close()
    finally:
        drop_database(name)
    return sorted(d["patient_name"] for d in service.documents), {
        d["study_description"] for d in service.documents
    }


def test_names_arrive_as_unicode_from_latin1_database(service, tmp_path):
    names, descs = _round_trip_names("latin1", service, tmp_path)
    assert names == sorted(NAMES)
    assert descs == {f"DESCRIPCIÓN {pn}" for pn in NAMES}


def test_names_arrive_as_unicode_from_utf8_database(service, tmp_path):
    names, descs = _round_trip_names("utf8", service, tmp_path)
    assert names == sorted(NAMES)
    assert descs == {f"DESCRIPCIÓN {pn}" for pn in NAMES}


def test_interrupted_initial_resumes_without_resending(pacs, service, configs):
    pacs.add_studies(40)
    assert main(["initial", "--limit", "15", *configs]) == 0
    first = service.study_pks()
    assert len(first) == 15
    assert pacs.query("SELECT status FROM study_service WHERE study_pk = -1")[0]["status"]
    # The next plain tick carries on with the initial load.
    assert main(configs) == 0
    assert len(service.received) == 40
    assert len(set(service.study_pks())) == 40
    assert not pacs.query("SELECT * FROM study_service WHERE study_pk = -1")


def test_initial_interrupted_while_enqueueing_is_finished_by_the_next_initial(
    pacs, service, configs
):
    pks = pacs.add_studies(30)
    pacs.archive_predates_install()
    # As if a first `initial` died after enqueueing the first 10 studies.
    pacs.execute(
        "INSERT INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        " VALUES (-1, 'initial', NOW(), %s)",
        (pks[9],),
    )
    assert main(["initial", *configs]) == 0
    assert service.study_pks() == pks[10:]  # the first ten were never enqueued here


def test_initial_reads_the_archive_at_the_pace_of_sending(pacs, service, tmp_path):
    """The PACS is read a few pages ahead of the sending, not all at once."""
    page = 10
    pacs.add_studies(300)
    pacs.archive_predates_install()  # else the tick before the load enqueues them all
    # A fixed concurrency: the studies in flight are part of the bound below.
    configs = write_configs(tmp_path, pacs.name, service.url, page_size=page, concurrency=4)
    service.delay_seconds = 0.005
    ahead = []

    def count_lead(number, request):
        enqueued = pacs.query("SELECT COUNT(*) AS n FROM study_service WHERE study_pk > 0")
        ahead.append(enqueued[0]["n"] - number)
        return 201, "{}"

    service.respond = count_lead
    assert main(["initial", *configs]) == 0
    assert len(set(service.study_pks())) == 300
    # The pages ahead, the page being sent, and the studies in flight.
    assert max(ahead) <= (INITIAL_LEAD_PAGES + 1) * page + 3 * 4


def test_initial_stays_under_max_studies_per_second(pacs, service, tmp_path):
    pacs.add_studies(120)
    pacs.archive_predates_install()
    configs = write_configs(tmp_path, pacs.name, service.url, max_studies_per_second=60)
    started = time.monotonic()
    assert main(["initial", *configs]) == 0
    assert time.monotonic() - started >= 120 / 60 * 0.9
    assert len(set(service.study_pks())) == 120


def test_resumed_initial_passes_pages_already_sent(pacs, service, tmp_path):
    """Pages of studies a tick already sent during an interrupted load enqueue
    nothing pending: the sending must not wait for them forever."""
    pks = pacs.add_studies(100)
    pacs.archive_predates_install()
    pacs.execute(
        "INSERT INTO study_service (study_pk, status, enqueued_at, cursor_pk)"
        " VALUES (-1, 'initial', NOW() - INTERVAL '1' HOUR, 0)"
    )
    pacs.execute(
        "INSERT INTO study_service (study_pk, status, attempts, sent_at)"
        " SELECT pk, 'sent', 1, NOW() FROM study WHERE pk <= %s",
        (pks[59],),
    )
    configs = write_configs(tmp_path, pacs.name, service.url, page_size=10)
    outcome = []
    run = threading.Thread(target=lambda: outcome.append(main(["initial", *configs])))
    run.start()
    run.join(timeout=60)
    assert outcome == [0], "initial did not finish"
    assert service.study_pks() == pks[60:]


def test_initial_again_sends_everything_again(pacs, service, configs):
    pks = pacs.add_studies(4)
    assert main(["initial", *configs]) == 0
    assert main(configs) == 0
    assert main(["initial", *configs]) == 0
    assert service.study_pks() == sorted(pks + pks)


def test_tick_after_initial_enqueues_nothing(pacs, service, configs):
    """initial and indexer_process compute the same row version."""
    pacs.add_studies(6, updated_time=None)  # all within the safety window
    assert main(["initial", *configs]) == 0
    assert pacs.call_indexer_process() == 0


def test_summary_line_and_no_secrets_or_names(pacs, service, configs, capsys):
    pacs.add_study(pacs.add_patient("SECRETO^NOMBRE"), updated_time=LONG_AGO)
    pacs.archive_predates_install()
    assert main(["initial", "-v", *configs]) == 0
    err = capsys.readouterr().err
    assert "INFO enqueued 1, sent 1, unchanged 0, failed 0, still pending 0, " in err
    assert "DEBUG study 1 sent (HTTP 201)" in err
    assert API_KEY not in err
    assert "SECRETO" not in err


def test_quiet_prints_nothing_on_success(pacs, service, configs, capsys):
    pacs.add_study(pacs.add_patient())
    assert main(["initial", "-q", *configs]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out == ""


def test_study_deleted_after_enqueue_is_marked_deleted(pacs, service, configs):
    patient = pacs.add_patient()
    keep = pacs.add_study(patient)
    gone = pacs.add_study(patient)
    pacs.call_indexer_process()
    pacs.execute("DELETE FROM study WHERE pk = %s", (gone,))
    assert main(configs) == 0
    assert service.study_pks() == [keep]
    assert pacs.queue()[gone]["status"] == "deleted"
