"""Appointment requests over HTTP: the same core and the same forwarding
as over RPC, and a patient kept to their own requests."""

import uuid

import pytest

from patient.models import AppointmentRequest
from tests.conftest import wait_for
from tests.factories import patient
from tests.http_client import token
from tests.test_appointments import soon, video_visit
from tests.test_http import (
    ADMIN,
    CLINICIAN,
    assert_problem,
    register,
    registered_patient,
)


@pytest.fixture
def alice(api):
    return registered_patient(api, "alice")


@pytest.fixture
def bob(api):
    return registered_patient(api, "bob")


def ask(api, who, body=None, **kwargs):
    stored, credentials = who
    return api.post(
        f"/patients/{stored['id']}/appointment-requests",
        as_=credentials,
        json=body or video_visit(),
        **kwargs,
    )


def test_a_patient_asks_and_the_request_is_forwarded_with_a_ticket(
    api, alice, queue_up
):
    _, credentials = alice
    window = {"start": soon(24), "end": soon(26)}

    response = ask(api, alice, video_visit(preferred_window=window))

    assert response.status_code == 202
    made = response.json()
    assert response.headers["Location"] == f"/appointment-requests/{made['request_id']}"
    assert made["status"] in ("pending", "forwarded")

    def forwarded():
        found = api.get(response.headers["Location"], as_=credentials).json()
        return found if found["status"] == "forwarded" else None

    assert wait_for(forwarded)["ticket"]["id"].startswith("T-")


def test_without_the_queue_service_a_request_is_taken_and_waits(
    api, alice, no_queue_service
):
    response = ask(api, alice)

    assert response.status_code == 202
    assert response.json()["status"] == "pending"


def test_a_retried_request_with_its_key_is_the_same_request(api, alice):
    first = ask(api, alice, headers={"Idempotency-Key": "visit-1"})
    again = ask(api, alice, headers={"Idempotency-Key": "visit-1"})
    other = ask(
        api, alice, video_visit(reason="other"), headers={"Idempotency-Key": "visit-1"}
    )

    assert again.status_code == 202
    assert again.json()["request_id"] == first.json()["request_id"]
    assert_problem(other, 409, "idempotency-key-reused")


def test_an_invalid_request_is_400_with_errors_per_field(api, alice):
    response = ask(api, alice, {"reason": "", "modality": "carrier pigeon", "x": 1})

    body = assert_problem(response, 400, "invalid-appointment-request")
    assert set(body["errors"]) == {"reason", "modality", "x"}


def test_an_inactive_patient_cannot_ask(api, alice):
    stored, _ = alice
    api.post(f"/patients/{stored['id']}/deactivate", as_=ADMIN)

    assert_problem(ask(api, alice), 409, "patient-inactive")


def test_a_patient_lists_reads_and_cancels_their_own_requests(api, alice):
    stored, credentials = alice
    made = [ask(api, alice).json()["request_id"] for _ in range(3)]

    first = api.get(
        f"/patients/{stored['id']}/appointment-requests?count=2", as_=credentials
    )
    second = api.get(first.json()["next"], as_=credentials)
    listed = (
        first.json()["appointment_requests"] + second.json()["appointment_requests"]
    )
    assert [r["request_id"] for r in listed] == made[::-1]

    cancelled = api.post(f"/appointment-requests/{made[0]}/cancel", as_=credentials)
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"


def test_another_patients_requests_answer_as_if_they_did_not_exist(api, alice, bob):
    made = ask(api, alice).json()
    _, bobs_token = bob

    theirs = api.get(f"/appointment-requests/{made['request_id']}", as_=bobs_token)
    nobodys = api.get(f"/appointment-requests/{uuid.uuid4()}", as_=bobs_token)
    cancel = api.post(
        f"/appointment-requests/{made['request_id']}/cancel", as_=bobs_token
    )
    listing = api.get(
        f"/patients/{made['patient_id']}/appointment-requests", as_=bobs_token
    )
    asking = api.post(
        f"/patients/{made['patient_id']}/appointment-requests",
        as_=bobs_token,
        json=video_visit(),
    )

    assert theirs.status_code == nobodys.status_code == cancel.status_code == 404
    assert theirs.json() == nobodys.json() == cancel.json()
    assert_problem(listing, 404, "patient-not-found")
    assert_problem(asking, 404, "patient-not-found")
    still = api.get(f"/appointment-requests/{made['request_id']}", as_=CLINICIAN)
    assert still.json()["status"] != "cancelled"


@pytest.mark.parametrize(
    "role, expected", [("clinician", 202), ("admin", 202), ("receptionist", 403)]
)
def test_staff_ask_for_any_patient(api, role, expected):
    stored = register(api, patient()).json()

    response = api.post(
        f"/patients/{stored['id']}/appointment-requests",
        as_=token(role),
        json=video_visit(),
    )

    assert response.status_code == expected


def test_a_failed_request_cannot_be_cancelled(api, alice, db):
    made = ask(api, alice).json()
    db.execute(
        AppointmentRequest.__table__.update()
        .where(AppointmentRequest.id == uuid.UUID(made["request_id"]))
        .values(status="failed")
    )
    db.commit()

    response = api.post(f"/appointment-requests/{made['request_id']}/cancel", as_=ADMIN)

    assert_problem(response, 409, "appointment-not-cancellable")


def test_an_appointment_request_in_fhir_json_is_415(api, alice):
    stored, credentials = alice

    response = api.post(
        f"/patients/{stored['id']}/appointment-requests",
        as_=credentials,
        data='{"reason": "cough", "modality": "video"}',
        headers={"Content-Type": "application/fhir+json"},
    )

    assert_problem(response, 415, "unsupported-media-type")
