"""Appointment requests through the real broker and database, with the
stand-in Queue Service where one is needed."""

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import pytest
from eventlet.semaphore import Semaphore
from nameko.testing.services import worker_factory
from sqlalchemy import select
from sqlalchemy.orm import Session

from patient import records
from patient.caller import SYSTEM
from patient.errors import (
    AppointmentNotCancellable,
    AppointmentRequestNotFound,
    IdempotencyKeyReused,
    InvalidAppointmentRequest,
    InvalidRequest,
    PatientInactive,
    PatientNotFound,
)
from patient.models import AppointmentRequest, AuditEvent, OutboxMessage
from patient.service import PatientService
from tests.conftest import QUEUE_SETTINGS, wait_for
from tests.factories import patient

UNKNOWN_ID = "5d1e7a3b-0000-4000-8000-000000000000"


def soon(hours):
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


def video_visit(**fields):
    request = {"reason": "persistent cough", "priority": "routine", "modality": "video"}
    request.update(fields)
    return request


@pytest.fixture
def someone(patients):
    return patients.register_patient(patient())


def status_of(patients, request_id, wanted):
    def check():
        found = patients.get_appointment_request(request_id)
        return found if found["status"] == wanted else None

    return wait_for(check)


def test_a_request_is_stored_and_forwarded_with_its_ticket(patients, someone, queue_up):
    window = {"start": soon(24), "end": soon(26)}
    made = patients.request_appointment(
        someone["id"], video_visit(priority="urgent", preferred_window=window)
    )

    assert made["patient_id"] == someone["id"]
    assert made["status"] in ("pending", "forwarded")
    forwarded = status_of(patients, made["request_id"], "forwarded")
    assert forwarded["ticket"]["id"].startswith("T-")
    assert forwarded["ticket"]["position"] >= 1
    assert forwarded["priority"] == "urgent"
    assert forwarded["preferred_window"]["start"].endswith("Z")
    held = queue_up.report()[made["request_id"]]
    assert (held["status"], held["calls"]) == ("queued", 1)


def test_the_priority_defaults_to_routine(patients, someone):
    request = video_visit()
    del request["priority"]
    assert patients.request_appointment(someone["id"], request)["priority"] == (
        "routine"
    )


@pytest.mark.parametrize(
    ("request_", "field"),
    [
        ({"priority": "routine", "modality": "video"}, "reason"),
        (video_visit(reason=""), "reason"),
        (video_visit(reason=" \n "), "reason"),
        (video_visit(reason="x" * 2001), "reason"),
        (video_visit(reason="cough\x00"), "reason"),
        (video_visit(priority="stat"), "priority"),
        (video_visit(modality="carrier-pigeon"), "modality"),
        (video_visit(room="12"), "room"),
        (video_visit(preferred_window={"start": soon(3)}), "preferred_window.end"),
        (
            video_visit(preferred_window={"start": soon(3), "end": soon(2)}),
            "preferred_window.start",
        ),
        (
            video_visit(preferred_window={"start": soon(-3), "end": soon(-2)}),
            "preferred_window.end",
        ),
        (
            video_visit(preferred_window={"start": "2030-01-01T10:00", "end": soon(2)}),
            "preferred_window.start",
        ),
        (
            video_visit(preferred_window={"start": soon(24 * 400), "end": soon(9999)}),
            "preferred_window.start",
        ),
        (
            video_visit(
                preferred_window={"start": "0001-01-01T00:00:00+14:00", "end": soon(2)}
            ),
            "preferred_window.start",
        ),
        (
            video_visit(
                preferred_window={"start": soon(1), "end": "9999-12-31T20:00:00-05:00"}
            ),
            "preferred_window.end",
        ),
        (
            video_visit(
                preferred_window={
                    "start": "2030-01-01T10:00:00+23:59",
                    "end": "2030-01-01T12:00:00+23:59",
                }
            ),
            "preferred_window.start",
        ),
        (
            video_visit(preferred_window={"start": soon(1), "end": soon(24 * 32)}),
            "preferred_window.end",
        ),
        ("a cough", "_schema"),
    ],
)
def test_a_bad_request_is_refused_by_field_and_nothing_is_stored(
    patients, someone, db, request_, field
):
    with pytest.raises(InvalidAppointmentRequest) as refused:
        patients.request_appointment(someone["id"], request_)

    assert field in refused.value.errors
    assert db.scalar(select(AppointmentRequest.id)) is None


def test_unknown_and_inactive_patients_cannot_request(patients, someone):
    with pytest.raises(PatientNotFound):
        patients.request_appointment(UNKNOWN_ID, video_visit())
    with pytest.raises(PatientNotFound):
        patients.request_appointment("not-an-id", video_visit())

    patients.deactivate_patient(someone["id"])
    with pytest.raises(PatientInactive) as refused:
        patients.request_appointment(someone["id"], video_visit())
    assert refused.value.patient_id == someone["id"]


def test_the_same_idempotency_key_returns_the_same_request(patients, someone, db):
    first = patients.request_appointment(someone["id"], video_visit(), "visit-1")
    again = patients.request_appointment(someone["id"], video_visit(), "visit-1")

    assert again["request_id"] == first["request_id"]
    shouted = patients.request_appointment(
        someone["id"].upper(), video_visit(), "visit-1"
    )
    assert shouted["request_id"] == first["request_id"]
    with pytest.raises(IdempotencyKeyReused):
        patients.request_appointment(
            someone["id"], video_visit(modality="phone"), "visit-1"
        )
    assert len(db.scalars(select(AppointmentRequest.id)).all()) == 1


def test_a_request_and_its_outbox_message_are_written_together(
    patients, someone, db, no_queue_service
):
    made = patients.request_appointment(someone["id"], video_visit())

    message = db.scalars(select(OutboxMessage)).one()
    assert str(message.request_id) == made["request_id"]
    assert message.action == "enqueue"
    assert made["status"] == "pending"


def test_requests_are_listed_newest_first_a_page_at_a_time(patients, someone):
    made = [
        patients.request_appointment(someone["id"], video_visit(reason=f"visit {n}"))
        for n in range(5)
    ]

    first = patients.list_appointment_requests(someone["id"], count=3)
    rest = patients.list_appointment_requests(
        someone["id"], count=3, cursor=first["next_cursor"]
    )
    listed = first["appointment_requests"] + rest["appointment_requests"]

    assert [r["request_id"] for r in listed] == [
        r["request_id"] for r in reversed(made)
    ]
    assert rest["next_cursor"] is None


def test_the_list_filters_by_status_and_refuses_bad_arguments(patients, someone):
    kept = patients.request_appointment(someone["id"], video_visit())
    dropped = patients.request_appointment(someone["id"], video_visit())
    patients.cancel_appointment_request(dropped["request_id"])

    cancelled = patients.list_appointment_requests(someone["id"], status="cancelled")
    ids = [r["request_id"] for r in cancelled["appointment_requests"]]
    assert ids == [dropped["request_id"]]
    assert kept["request_id"] not in ids

    page = patients.list_appointment_requests(someone["id"], count=1)
    other = patients.register_patient(patient())
    for patient_id, bad in [
        (someone["id"], {"status": "lost"}),
        (someone["id"], {"count": 0}),
        (someone["id"], {"cursor": "bm9wZQ=="}),
        (someone["id"], {"status": "pending", "cursor": page["next_cursor"]}),
        (other["id"], {"cursor": page["next_cursor"]}),
    ]:
        with pytest.raises(InvalidRequest):
            patients.list_appointment_requests(patient_id, **bad)
    with pytest.raises(PatientNotFound):
        patients.list_appointment_requests(UNKNOWN_ID)


def test_unknown_requests_are_not_found(patients):
    for request_id in (UNKNOWN_ID, "nope"):
        with pytest.raises(AppointmentRequestNotFound):
            patients.get_appointment_request(request_id)
        with pytest.raises(AppointmentRequestNotFound):
            patients.cancel_appointment_request(request_id)


def test_a_request_never_sent_is_cancelled_here_alone(
    patients, someone, queue_stand_in, no_queue_service
):
    made = patients.request_appointment(someone["id"], video_visit())
    assert made["status"] == "pending"

    cancelled = patients.cancel_appointment_request(made["request_id"])
    queue_stand_in.start()

    assert cancelled["status"] == "cancelled"
    other = patients.request_appointment(someone["id"], video_visit())
    status_of(patients, other["request_id"], "forwarded")
    # Never queued; at most told to cancel, had the relay been mid-call.
    held = queue_stand_in.report().get(made["request_id"], {"calls": 0})
    assert held["calls"] == 0


def test_a_forwarded_request_is_cancelled_at_the_queue_service_too(
    patients, someone, queue_up
):
    made = patients.request_appointment(someone["id"], video_visit())
    status_of(patients, made["request_id"], "forwarded")

    cancelled = patients.cancel_appointment_request(made["request_id"])
    again = patients.cancel_appointment_request(made["request_id"])

    assert cancelled["status"] == again["status"] == "cancelled"
    assert again["version"] == cancelled["version"]
    wait_for(
        lambda: (
            patients.get_appointment_request(made["request_id"])["cancellation"]
            == "confirmed"
        )
    )
    held = queue_up.report()[made["request_id"]]
    assert (held["status"], held["calls"]) == ("cancelled", 1)


def test_a_request_the_queue_service_refuses_fails_with_the_reason(
    patients, someone, queue_up
):
    queue_up.misbehave(refusing=True)
    made = patients.request_appointment(someone["id"], video_visit())

    failed = status_of(patients, made["request_id"], "failed")
    assert failed["failure_reason"] == "refused-by-queue-service"
    assert failed["cancellation"] is None
    with pytest.raises(AppointmentNotCancellable):
        patients.cancel_appointment_request(made["request_id"])


def test_a_request_fails_once_the_retry_budget_is_spent_and_is_withdrawn(
    patients, someone, queue_up, db
):
    attempts = QUEUE_SETTINGS["FORWARD_MAX_ATTEMPTS"]
    queue_up.misbehave(fail_next=attempts)
    made = patients.request_appointment(someone["id"], video_visit())

    failed = status_of(patients, made["request_id"], "failed")
    assert failed["failure_reason"] == "retries-exhausted"
    # Calls that failed inside the Queue Service may have queued it: the
    # Patient Service withdraws it.
    wait_for(
        lambda: (
            patients.get_appointment_request(made["request_id"])["cancellation"]
            == "confirmed"
        )
    )
    assert queue_up.report()[made["request_id"]]["status"] == "cancelled"


def test_every_change_of_a_request_is_audited_with_its_actor(
    patients, cluster, someone, queue_up, db
):
    made = patients.request_appointment(someone["id"], video_visit())
    status_of(patients, made["request_id"], "forwarded")
    patients.cancel_appointment_request(made["request_id"])
    wait_for(
        lambda: (
            patients.get_appointment_request(made["request_id"])["cancellation"]
            == "confirmed"
        )
    )

    events = db.execute(
        select(AuditEvent.action, AuditEvent.version, AuditEvent.actor)
        .where(AuditEvent.request_id == made["request_id"])
        .order_by(AuditEvent.id)
    ).all()
    assert [(e.action, e.version) for e in events] == [
        ("appointment-requested", 1),
        ("appointment-forwarded", 2),
        ("appointment-cancelled", 3),
        ("appointment-cancel-confirmed", 4),
    ]
    assert events[1].actor == "system:outbox-relay"


def test_health_reports_the_queue_service_degraded_never_the_service_down(
    patients, someone, queue_stand_in
):
    queue_stand_in.start()
    queue_stand_in.stop()  # its queue stays, with nobody to answer
    for _ in range(3):
        patients.request_appointment(someone["id"], video_visit())

    health = wait_for(
        lambda: (h := patients.health())["queue_service"]["status"] == "degraded" and h
    )

    assert health["status"] == "ok"
    assert health["queue_service"]["owed"] >= 1
    assert health["queue_service"]["circuit"] in ("open", "half_open")


class BrokenQueue:
    """A queue_service dependency whose client fails in an unforeseen way."""

    circuit = "closed"
    open_remaining = 0

    def __init__(self):
        self.inline = Semaphore(1)

    def enqueue_appointment(self, request):
        raise RuntimeError("unforeseen")


def test_a_request_stored_survives_a_failure_to_forward_it_at_once(engine, db):
    someone = records.register_patient(db, patient(), SYSTEM)
    with Session(engine) as session:
        service = worker_factory(
            PatientService,
            db=SimpleNamespace(session=session),
            caller=SYSTEM,
            config={},
            queue_service=BrokenQueue(),
        )
        made = service.request_appointment(someone["id"], video_visit())

    assert made["status"] == "pending"
    stored = db.get(AppointmentRequest, uuid.UUID(made["request_id"]))
    assert stored.status == "pending"


def test_a_queue_service_answering_only_errors_shows_as_degraded(
    patients, someone, queue_up
):
    queue_up.misbehave(failing=True)
    patients.request_appointment(someone["id"], video_visit())

    health = wait_for(
        lambda: (h := patients.health())["queue_service"]["failing"] >= 1 and h
    )

    assert health["queue_service"]["status"] == "degraded"
    assert health["status"] == "ok"
