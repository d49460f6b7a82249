"""Appointment requests: taking, reading, listing and cancelling them.

A request and the outbox message that will hand it to the Queue Service are
written in one transaction, so no request is ever stored without the means
of forwarding it; ``patient.relay`` does the forwarding. Like
``patient.records``, these functions take a session and a ``Caller`` and know
nothing of AMQP or HTTP.
"""

import base64
import binascii
import logging
import uuid
from datetime import UTC, datetime

from marshmallow import ValidationError
from sqlalchemy import delete, select, tuple_
from sqlalchemy.dialects.postgresql import insert as pg_insert

from patient import audit, idempotency, records
from patient.errors import (
    AppointmentNotCancellable,
    AppointmentRequestNotFound,
    InvalidAppointmentRequest,
    InvalidRequest,
    PatientInactive,
)
from patient.models import AppointmentRequest, OutboxMessage
from patient.schemas import ListAppointmentRequests, NewAppointmentRequest

log = logging.getLogger(__name__)

PENDING, FORWARDED, CANCELLED, FAILED = "pending", "forwarded", "cancelled", "failed"
ENQUEUE, CANCEL = "enqueue", "cancel"
# Whether the Queue Service has confirmed the cancellation of a request it
# holds, or may hold.
CONFIRMED = "confirmed"


def request_appointment(session, patient_id, request, caller, idempotency_key=None):
    """Store the request as pending, with its outbox message; return it.

    The same idempotency key (or a redelivery of the same message) returns
    the request made the first time, as it stands now.
    """
    idempotency.check_key(idempotency_key)
    scope, key = idempotency.key_for("appointment", idempotency_key, caller)
    request_hash = idempotency.fingerprint([_canonical(patient_id), request])
    if key is not None and (
        seen := idempotency.answered(session, scope, key, request_hash)
    ):
        return get_appointment_request(session, seen["request_id"])

    fields = _load(NewAppointmentRequest(), request, InvalidAppointmentRequest)
    patient = records.find_row(session, patient_id)
    if patient.active is False:
        raise PatientInactive(str(patient.id))

    now = datetime.now(UTC)
    window = fields["preferred_window"] or {}
    row = AppointmentRequest(
        id=uuid.uuid4(),
        patient_id=patient.id,
        version=1,
        status=PENDING,
        reason=fields["reason"],
        priority=fields["priority"],
        modality=fields["modality"],
        preferred_start=window.get("start"),
        preferred_end=window.get("end"),
        created_at=now,
        updated_at=now,
    )
    with session.begin_nested():
        if key is not None:
            replay = idempotency.claim(session, scope, key, request_hash)
            if replay is not None:
                return get_appointment_request(session, replay["request_id"])
        session.add(row)
        session.flush()
        add_message(session, row.id, ENQUEUE, now)
        audit.record(
            session, "appointment-requested", caller, now, row.patient_id, 1, row.id
        )
        if key is not None:
            answer = {"request_id": str(row.id)}
            idempotency.record_answer(session, scope, key, patient.id, answer)
    session.commit()
    log.info("appointment request %s for patient %s", row.id, row.patient_id)
    return view(row)


def get_appointment_request(session, request_id):
    return view(find_row(session, request_id))


def list_appointment_requests(session, patient_id, status=None, count=20, cursor=None):
    """The patient's requests, newest first, a page at a time."""
    args = {"status": status, "count": count, "cursor": cursor}
    options = _load(ListAppointmentRequests(), args, InvalidRequest)
    patient = records.find_row(session, patient_id)

    query = (
        select(AppointmentRequest)
        .where(AppointmentRequest.patient_id == patient.id)
        .order_by(AppointmentRequest.created_at.desc(), AppointmentRequest.id.desc())
        .limit(options["count"] + 1)
    )
    if options["status"] is not None:
        query = query.where(AppointmentRequest.status == options["status"])
    # A cursor goes on only with the list it came from.
    scope = f"{patient.id}|{options['status']}"
    if options["cursor"] is not None:
        created_at, last_id = _read_cursor(options["cursor"], scope)
        query = query.where(
            tuple_(AppointmentRequest.created_at, AppointmentRequest.id)
            < tuple_(created_at, last_id)
        )
    rows = session.execute(query).scalars().all()

    page, more = rows[: options["count"]], len(rows) > options["count"]
    return {
        "appointment_requests": [view(row) for row in page],
        "next_cursor": _cursor(page[-1], scope) if more else None,
    }


def cancel_appointment_request(session, request_id, caller):
    """Cancel the request. One that the Queue Service has, or may have, is
    cancelled there too, through the outbox. Cancelling a cancelled request
    changes nothing and returns it."""
    row = find_row(session, request_id, lock=True)
    if row.status == CANCELLED:
        session.commit()
        return view(row)
    if row.status == FAILED:
        raise AppointmentNotCancellable(str(row.id), row.status)

    now = datetime.now(UTC)
    enqueue = session.execute(
        select(OutboxMessage)
        .where(OutboxMessage.request_id == row.id, OutboxMessage.action == ENQUEUE)
        .with_for_update()
    ).scalar_one_or_none()
    reached = row.status == FORWARDED or (
        enqueue is not None and enqueue.maybe_delivered
    )
    if enqueue is not None:
        session.execute(delete(OutboxMessage).where(OutboxMessage.id == enqueue.id))
    if reached:
        add_message(session, row.id, CANCEL, now)
        row.cancellation = PENDING
    change(session, row, CANCELLED, "appointment-cancelled", caller, now)
    session.commit()
    log.info("appointment request %s cancelled", row.id)
    return view(row)


def find_row(session, request_id, lock=False):
    key, row = records.by_id(
        session, AppointmentRequest, request_id, "request_id", lock
    )
    if row is None:
        raise AppointmentRequestNotFound(str(key) if key else "")
    return row


def change(session, row, status, action, caller, now):
    """Move the request to ``status`` as a new version, audited."""
    row.status = status
    row.version += 1
    row.updated_at = now
    session.flush()
    audit.record(session, action, caller, now, row.patient_id, row.version, row.id)


def add_message(session, request_id, action, now):
    session.execute(
        pg_insert(OutboxMessage)
        .values(
            request_id=request_id,
            action=action,
            attempts=0,
            next_attempt_at=now,
            maybe_delivered=False,
            created_at=now,
        )
        .on_conflict_do_nothing()
    )


def view(row):
    """The request as callers see it."""
    window = None
    if row.preferred_start is not None:
        window = {"start": _time(row.preferred_start), "end": _time(row.preferred_end)}
    ticket = None
    if row.ticket_id is not None:
        ticket = {"id": row.ticket_id, "position": row.queue_position}
    return {
        "request_id": str(row.id),
        "patient_id": str(row.patient_id),
        "status": row.status,
        "version": str(row.version),
        "reason": row.reason,
        "priority": row.priority,
        "modality": row.modality,
        "preferred_window": window,
        "ticket": ticket,
        "cancellation": row.cancellation,
        "failure_reason": row.failure_reason,
        "created_at": _time(row.created_at),
        "updated_at": _time(row.updated_at),
    }


def _time(moment):
    moment = moment.astimezone(UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _load(schema, data, error):
    if not isinstance(data, dict):
        raise error({"_schema": ["must be an object"]})
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise error(_flatten(exc.messages)) from None


def _flatten(messages, prefix=""):
    """marshmallow's nested messages as ``field.subfield: [messages]``."""
    flat = {}
    for field, value in messages.items():
        path = f"{prefix}{field}"
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = [str(m) for m in value]
    return flat


def _canonical(patient_id):
    """The id as the database writes it, so that a retry in other letter
    case is the same request."""
    try:
        return str(uuid.UUID(str(patient_id)[:64]))
    except ValueError:
        return str(patient_id)


def _cursor(row, scope):
    raw = f"{row.created_at.isoformat()}|{row.id}|{scope}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def _read_cursor(cursor, scope):
    try:
        created_at, last_id, rest = (
            base64.urlsafe_b64decode(cursor).decode().split("|", 2)
        )
        moment = datetime.fromisoformat(created_at)
        if rest != scope or moment.tzinfo is None:
            raise ValueError("another list")
        return moment, uuid.UUID(last_id)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise InvalidRequest({"cursor": ["is not a cursor of this list"]}) from None
