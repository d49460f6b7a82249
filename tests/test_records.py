"""Registering, reading, updating and deactivating patients, through the
running service on the real broker and database."""

import json
import uuid

import eventlet
import pytest
from nameko.standalone.rpc import ClusterRpcProxy
from sqlalchemy import func, select

from patient import records, search
from patient.caller import Caller
from patient.errors import (
    DuplicatePatient,
    IdempotencyKeyReused,
    InvalidPatient,
    InvalidRequest,
    PatientNotFound,
    VersionConflict,
)
from patient.models import AuditEvent, IdempotencyRecord, Patient
from tests.factories import example, patient


def count(db, model):
    db.rollback()
    return db.execute(select(func.count()).select_from(model)).scalar_one()


def test_register_returns_the_resource_as_given_with_server_id_and_meta(patients):
    given = example()

    stored = patients.register_patient(given)

    uuid.UUID(stored["id"])
    assert stored["meta"]["versionId"] == "1"
    assert stored["meta"]["lastUpdated"].endswith("Z")
    unchanged = {k: v for k, v in stored.items() if k not in ("id", "meta")}
    assert unchanged == {k: v for k, v in given.items() if k not in ("id", "meta")}
    assert patients.get_patient(stored["id"]) == stored


def test_numbers_come_back_as_written(patients):
    odd = [
        {"url": "urn:test:a", "valueDecimal": -0.0},
        {"url": "urn:test:b", "valueDecimal": 1e300},
        {"url": "urn:test:c", "valueDecimal": 0.1},
    ]
    stored = patients.register_patient(patient(extension=odd))

    again = patients.get_patient(stored["id"])

    assert json.dumps(again["extension"]) == json.dumps(odd)


def test_register_keeps_callers_meta_but_sets_version_and_time(patients):
    stored = patients.register_patient(
        patient(meta={"versionId": "99", "profile": ["http://example.org/p"]})
    )

    assert stored["meta"]["versionId"] == "1"
    assert stored["meta"]["profile"] == ["http://example.org/p"]


def test_meta_that_is_not_an_object_is_refused(patients):
    with pytest.raises(InvalidPatient) as raised:
        patients.register_patient(patient(meta="v1"))
    assert "meta" in raised.value.errors


def test_register_accepts_partial_birth_dates(patients):
    for birth_date in ("1974", "1974-12"):
        assert patients.register_patient(patient(birthDate=birth_date))[
            "birthDate"
        ] == (birth_date)


def test_same_idempotency_key_and_resource_returns_first_result_once(patients, db):
    resource = patient()

    first = patients.register_patient(resource, idempotency_key="k-1")
    again = patients.register_patient(resource, idempotency_key="k-1")

    assert again == first
    assert count(db, Patient) == 1
    assert count(db, AuditEvent) == 1


def test_same_idempotency_key_with_another_resource_is_refused(patients, db):
    patients.register_patient(patient(), idempotency_key="k-2")

    with pytest.raises(IdempotencyKeyReused):
        patients.register_patient(patient(), idempotency_key="k-2")
    assert count(db, Patient) == 1


def test_identifier_held_by_another_patient_names_that_patient(patients, db):
    first = patients.register_patient(patient())
    copy = patient(identifier=first["identifier"])

    with pytest.raises(DuplicatePatient) as raised:
        patients.register_patient(copy)

    assert raised.value.existing_id == first["id"]
    assert count(db, Patient) == 1


def test_identifier_without_value_or_system_is_stored_but_not_unique(patients, db):
    loose = [{"system": "urn:test:loose"}, {"value": "no-system"}]

    patients.register_patient(patient(identifier=loose))
    patients.register_patient(patient(identifier=loose))

    assert count(db, Patient) == 2


def test_one_identifier_listed_twice_in_a_resource_is_one_patient(patients):
    twice = [{"system": "urn:test:mrn", "value": "TWICE"}] * 2

    stored = patients.register_patient(patient(identifier=twice))

    assert (
        patients.find_patient_by_identifier("urn:test:mrn", "TWICE")["id"]
        == stored["id"]
    )


def test_concurrent_registrations_of_one_identifier_make_one_patient(
    config, service, db
):
    resource = patient()
    outcomes = []

    def register(_):
        with ClusterRpcProxy(config, timeout=30) as proxy:
            try:
                outcomes.append(proxy.patient_service.register_patient(resource)["id"])
            except DuplicatePatient as exc:
                outcomes.append(("duplicate", exc.existing_id))

    pool = eventlet.GreenPool(20)
    list(pool.imap(register, range(20)))

    created = [o for o in outcomes if isinstance(o, str)]
    assert len(created) == 1
    assert {o[1] for o in outcomes if isinstance(o, tuple)} == set(created)
    assert count(db, Patient) == 1


@pytest.mark.parametrize(
    "value",
    ["a,b", "a|b", "a\\b", "with space", "x' OR '1'='1", "ünï-çødé", "%_%"],
)
def test_identifier_values_are_opaque_strings(patients, value):
    stored = patients.register_patient(
        patient(identifier=[{"system": "urn:test:odd", "value": value}])
    )

    assert (
        patients.find_patient_by_identifier("urn:test:odd", value)["id"] == stored["id"]
    )


def test_find_by_unknown_identifier_raises_not_found(patients):
    with pytest.raises(PatientNotFound):
        patients.find_patient_by_identifier("urn:test:mrn", "nobody")


@pytest.mark.parametrize("patient_id", [str(uuid.uuid4()), "not-a-uuid", "x" * 10_000])
def test_get_unknown_patient_raises_not_found(patients, patient_id):
    with pytest.raises(PatientNotFound):
        patients.get_patient(patient_id)


def test_update_replaces_the_resource_and_bumps_the_version(patients, db):
    stored = patients.register_patient(patient(gender="female"))
    changed = {**stored, "gender": "other", "name": [{"family": "Renamed"}]}

    updated = patients.update_patient(stored["id"], changed, "1")

    assert updated["meta"]["versionId"] == "2"
    assert updated["gender"] == "other"
    assert patients.get_patient(stored["id"]) == updated
    assert patients.search_patients({"family": "renamed"})["patients"] == [updated]
    assert patients.search_patients({"family": "testperson"})["patients"] == []
    assert count(db, AuditEvent) == 2


def test_stale_update_raises_version_conflict_and_changes_nothing(patients):
    stored = patients.register_patient(patient())
    patients.update_patient(stored["id"], {**stored, "gender": "male"}, 1)

    with pytest.raises(VersionConflict) as raised:
        patients.update_patient(stored["id"], {**stored, "gender": "other"}, 1)

    assert raised.value.current_version == "2"
    assert patients.get_patient(stored["id"])["gender"] == "male"


def test_update_cannot_take_another_patients_identifier(patients):
    first = patients.register_patient(patient())
    second = patients.register_patient(patient())

    with pytest.raises(DuplicatePatient) as raised:
        patients.update_patient(
            second["id"], {**second, "identifier": first["identifier"]}, 1
        )

    assert raised.value.existing_id == first["id"]
    assert patients.get_patient(second["id"]) == second


def test_update_accepts_the_id_in_any_case(patients):
    stored = patients.register_patient(patient())

    updated = patients.update_patient(stored["id"].upper(), stored, 1)

    assert updated["id"] == stored["id"]


def test_update_with_another_id_in_the_body_is_refused(patients):
    stored = patients.register_patient(patient())

    with pytest.raises(InvalidPatient) as raised:
        patients.update_patient(stored["id"], {**stored, "id": str(uuid.uuid4())}, 1)
    assert "id" in raised.value.errors


@pytest.mark.parametrize("version", [None, 0, -1, "abc", True, 1.5, [1]])
def test_update_needs_a_version_number(patients, version):
    stored = patients.register_patient(patient())

    with pytest.raises(InvalidRequest):
        patients.update_patient(stored["id"], stored, version)


def test_deactivate_keeps_the_record_readable_and_searchable(patients):
    stored = patients.register_patient(patient())

    inactive = patients.deactivate_patient(stored["id"])

    assert inactive["active"] is False
    assert inactive["meta"]["versionId"] == "2"
    assert patients.get_patient(stored["id"]) == inactive
    found = patients.search_patients({"identifier": stored["identifier"][0]["value"]})
    assert found["patients"] == [inactive]
    assert patients.search_patients({"active": False})["patients"] == [inactive]


def test_deactivating_twice_changes_nothing_the_second_time(patients, db):
    stored = patients.register_patient(patient())

    first = patients.deactivate_patient(stored["id"], expected_version=1)
    second = patients.deactivate_patient(stored["id"], expected_version=1)

    assert second == first
    assert count(db, AuditEvent) == 2


def test_deactivate_with_stale_version_raises_conflict(patients):
    stored = patients.register_patient(patient())
    patients.update_patient(stored["id"], stored, 1)

    with pytest.raises(VersionConflict):
        patients.deactivate_patient(stored["id"], expected_version=1)


def test_every_change_is_audited_with_version_and_service(patients, db):
    stored = patients.register_patient(patient())
    patients.update_patient(stored["id"], stored, 1)
    patients.deactivate_patient(stored["id"])

    db.rollback()
    events = db.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars().all()

    assert [(e.action, e.version) for e in events] == [
        ("create", 1),
        ("update", 2),
        ("deactivate", 3),
    ]
    assert {str(e.patient_id) for e in events} == {stored["id"]}
    assert all(e.actor == "service:standalone_rpc_proxy" for e in events)
    assert all(e.call_id.startswith("patient_service.") for e in events)


def test_audit_names_the_user_from_the_call_context(config, service, db):
    with ClusterRpcProxy(config, timeout=30, context_data={"user_id": "dr-who"}) as p:
        p.patient_service.register_patient(patient())

    db.rollback()
    assert db.execute(select(AuditEvent.actor)).scalar_one() == "dr-who"


def test_failed_write_leaves_no_audit_and_no_key(patients, db):
    first = patients.register_patient(patient())

    with pytest.raises(DuplicatePatient):
        patients.register_patient(
            patient(identifier=first["identifier"]), idempotency_key="k-dup"
        )

    assert count(db, AuditEvent) == 1
    db.rollback()
    assert (
        db.execute(
            select(func.count()).where(IdempotencyRecord.key == "k-dup")
        ).scalar_one()
        == 0
    )


def test_a_batch_the_bulk_write_refuses_goes_entry_by_entry(db, monkeypatch):
    caller = Caller(actor="test")
    first = patient()
    [stored] = records.register_patients(
        db, [{"resource": first, "idempotency_key": "b-1"}], caller
    )
    # As if the key and identifier were taken after the batch read what was
    # taken: the bulk insert then violates their uniqueness.
    monkeypatch.setattr(records._Batch, "_answers", lambda self: {})
    monkeypatch.setattr(records._Batch, "_holders", lambda self, entries: {})
    second = patient(name=[{"family": "Entryby", "given": ["Entry"]}])

    results = records.register_patients(
        db,
        [
            {"resource": first, "idempotency_key": "b-1"},
            {"resource": second, "idempotency_key": "b-2"},
        ],
        caller,
    )

    assert results[0] == {**stored, "status": "replayed"}
    assert results[1]["status"] == "created"
    found = search.search_patients(db, {"family": "entryby"})["patients"]
    assert [p["id"] for p in found] == [results[1]["id"]]
    assert count(db, Patient) == 2
    assert count(db, AuditEvent) == 2
