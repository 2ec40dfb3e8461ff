"""The mapping layer: one study row -> the document, a pure function."""

from __future__ import annotations

import datetime
import json

import pytest

from dicom_indexer.cli import main
from dicom_indexer.document import (
    DOCUMENT_KEYS,
    document_fingerprint,
    encode_document,
    study_document,
)

ROW = {
    "patient_pk": 7,
    "pat_id": "12.345.678-5",
    "pat_name": "MUÑOZ^JOSÉ",
    "study_pk": 42,
    "study_iuid": "1.2.3.4",
    "study_datetime": datetime.datetime(2024, 5, 17, 9, 42, 10),
    "study_desc": "TC CEREBRO",
    "mods_in_study": "CT\\SR",
    "num_series": 3,
    "num_instances": 254,
}


# The original client's README ("Formato JSON para INSERT (POST)"): the names
# the central service reads. Written out here, not taken from dicom_indexer, so
# that a rename in the client fails this test.
CONTRACT_KEYS = [
    "patient_pk",
    "patient_id",
    "patient_name",
    "study_pk",
    "study_iuid",
    "study_datetime",
    "study_description",
    "study_modality",
    "study_series",
    "study_instances",
    "center",
]


def test_document_has_exactly_the_original_contracts_keys():
    document = study_document(ROW, "000")
    assert list(document) == CONTRACT_KEYS
    assert list(DOCUMENT_KEYS) == CONTRACT_KEYS
    assert document["center"] == "000"


@pytest.mark.parametrize(
    "change, key, expected",
    [
        ({}, "study_datetime", "2024-05-17 09:42:10"),
        ({"study_datetime": None}, "study_datetime", None),
        ({"study_datetime": "0000-00-00 00:00:00"}, "study_datetime", None),
        (
            {"study_datetime": datetime.datetime(999, 1, 2, 3, 4, 5)},
            "study_datetime",
            "0999-01-02 03:04:05",
        ),
        ({"study_datetime": datetime.date(2020, 2, 29)}, "study_datetime", "2020-02-29 00:00:00"),
        ({}, "study_modality", "CT\\SR"),
        ({"mods_in_study": None}, "study_modality", None),
        ({}, "patient_name", "MUÑOZ^JOSÉ"),
        ({"pat_name": b"PE\xc3\x91A^ANA"}, "patient_name", "PEÑA^ANA"),
        ({"pat_name": b"PE\xd1A^ANA"}, "patient_name", "PEÑA^ANA"),  # latin-1 bytes
        ({"patient_pk": None, "pat_id": None, "pat_name": None}, "patient_pk", None),
        ({}, "study_series", 3),
        ({}, "study_instances", 254),
        ({}, "center", "CL-01"),
        (
            {"study_desc": 'COMILLAS "DOBLES" \\ Y\x01CONTROL'},
            "study_description",
            'COMILLAS "DOBLES" \\ Y\x01CONTROL',
        ),
    ],
)
def test_study_document(change, key, expected):
    document = study_document({**ROW, **change}, "CL-01")
    assert list(document) == list(DOCUMENT_KEYS)
    assert document[key] == expected


def test_body_is_ascii_json_that_round_trips():
    document = study_document({**ROW, "study_desc": 'Ñ\x01"\\'}, "CL-01")
    body = encode_document(document)
    assert body.isascii()
    assert json.loads(body) == document


def test_the_fingerprint_is_the_one_already_stored_and_sees_every_value():
    """study_service.sent_version keeps the fingerprint of the body the
    service acknowledged: one that an upgrade changed would send the whole
    archive again, and one blind to a value would never send its change."""
    body = encode_document(study_document(ROW, "CL-01"))
    assert body == (
        b'{"patient_pk":7,"patient_id":"12.345.678-5","patient_name":"MU\\u00d1OZ^JOS\\u00c9",'
        b'"study_pk":42,"study_iuid":"1.2.3.4","study_datetime":"2024-05-17 09:42:10",'
        b'"study_description":"TC CEREBRO","study_modality":"CT\\\\SR","study_series":3,'
        b'"study_instances":254,"center":"CL-01"}'
    )
    # The MD5 of the body, 16 bytes: what sent_version (BINARY(16)/bytea) holds.
    assert document_fingerprint(body).hex() == "c68a1d41dca70ec6fc41d214aba667ef"
    changes = [
        {"pat_name": "MUÑOZ^JOSE"},
        {"pat_id": "12.345.678-K"},
        {"study_desc": "TC CEREBRO "},
        {"study_datetime": datetime.datetime(2024, 5, 17, 9, 42, 11)},
        {"mods_in_study": "CT\\SR\\PR"},
        {"num_series": 4},
        {"num_instances": 255},
        {"study_iuid": "1.2.3.5"},
        {"patient_pk": 8},
    ]
    fingerprints = {
        document_fingerprint(encode_document(study_document({**ROW, **change}, "CL-01")))
        for change in changes
    }
    fingerprints.add(document_fingerprint(encode_document(study_document(ROW, "CL-02"))))
    assert document_fingerprint(body) not in fingerprints
    assert len(fingerprints) == len(changes) + 1


def test_the_same_rows_give_the_same_bytes_on_both_engines(tmp_path):
    """A site moving from MySQL to PostgreSQL (or the other way) sends the same
    bodies: the central service cannot tell the engines apart."""
    from conftest import (
        ENGINES,
        LONG_AGO,
        CentralService,
        PacsDb,
        create_database,
        drop_database,
        write_configs,
    )

    if set(ENGINES) != {"mysql", "postgresql"}:
        pytest.skip("needs both engines")
    bodies = {}
    for engine in ("mysql", "postgresql"):
        name = create_database("utf8", engine)
        db, service = PacsDb(name), CentralService()
        try:
            patient = db.add_patient("MUÑOZ^JOSÉ^ÁNGEL", "12.345.678-K")
            db.add_study(
                patient, desc='TC "CEREBRO" \\ SIN CONTRASTE', mods="CT\\SR", iuid="1.2.3.1"
            )
            db.add_study(patient, desc=None, mods=None, study_datetime=None, iuid="1.2.3.2")
            db.add_study(
                None, study_datetime=datetime.datetime(2024, 5, 17, 9, 42, 10), iuid="1.2.3.3"
            )
            db.add_study(
                db.add_patient(None, None), num_series=12, num_instances=2000, iuid="1.2.3.4"
            )
            db.execute("UPDATE study SET updated_time = %s", (LONG_AGO,))
            (tmp_path / engine).mkdir()
            args = write_configs(tmp_path / engine, name, service.url)
            assert main(["initial", *args]) == 0
            bodies[engine] = sorted(r.body for r in service.received)
        finally:
            service.stop()
            db.close()
            drop_database(name)
    assert len(bodies["mysql"]) == 4
    assert bodies["mysql"] == bodies["postgresql"]
