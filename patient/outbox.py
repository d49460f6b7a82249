"""The outbox of calls owed to the Queue Service: claiming due messages,
and recording what became of each attempt.

Each function runs one short transaction and commits it; none is ever open
while the Queue Service is called.
"""

import logging
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select

from patient.appointments import (
    CANCEL,
    CANCELLED,
    CONFIRMED,
    ENQUEUE,
    FAILED,
    FORWARDED,
    PENDING,
    add_message,
    change,
    find_row,
)
from patient.models import AppointmentRequest, OutboxMessage

log = logging.getLogger(__name__)

EXHAUSTED = "retries-exhausted"
REFUSED = "refused-by-queue-service"


@dataclass(frozen=True)
class Policy:
    """How hard the relay tries; every figure is a setting."""

    max_attempts: int = 20
    backoff_base_s: float = 1.0
    backoff_max_s: float = 300.0
    # Longer than a call's deadline: a claim outlives the call it covers.
    lease_s: float = 10.0

    @classmethod
    def from_config(cls, config):
        deadline = float(config.get("QUEUE_CALL_DEADLINE_S", 2))
        return cls(
            max_attempts=int(config.get("FORWARD_MAX_ATTEMPTS", cls.max_attempts)),
            backoff_base_s=float(
                config.get("FORWARD_BACKOFF_BASE_S", cls.backoff_base_s)
            ),
            backoff_max_s=float(config.get("FORWARD_BACKOFF_MAX_S", cls.backoff_max_s)),
            lease_s=deadline * 2 + 5,
        )

    def backoff(self, attempts):
        """Seconds before the next attempt: exponential, jittered over the
        upper half so that instances retrying together drift apart."""
        ceiling = min(self.backoff_max_s, self.backoff_base_s * 2 ** (attempts - 1))
        return random.uniform(ceiling / 2, ceiling)


@dataclass(frozen=True)
class Delivery:
    """A claimed outbox message and what to send for it."""

    message_id: int
    request_id: str
    action: str
    attempts: int
    was_maybe_delivered: bool
    payload: dict


def claim_due(session, policy, limit, request_id=None, now=None):
    """Claim up to ``limit`` due messages (only the enqueue message of
    ``request_id``, if given) and lease them for one attempt.

    ``SKIP LOCKED`` lets instances claim side by side without ever taking
    the same message; the lease keeps a claimed message from coming due
    again while its call runs.
    """
    now = now or datetime.now(UTC)
    query = (
        select(OutboxMessage, AppointmentRequest)
        .join(AppointmentRequest, AppointmentRequest.id == OutboxMessage.request_id)
        .where(OutboxMessage.next_attempt_at <= now)
        .order_by(OutboxMessage.next_attempt_at)
        .limit(limit)
        .with_for_update(of=OutboxMessage, skip_locked=True)
    )
    if request_id is not None:
        query = query.where(
            OutboxMessage.request_id == request_id, OutboxMessage.action == ENQUEUE
        )

    deliveries = []
    for message, request in session.execute(query).all():
        message.attempts += 1
        deliveries.append(
            Delivery(
                message_id=message.id,
                request_id=str(request.id),
                action=message.action,
                attempts=message.attempts,
                was_maybe_delivered=message.maybe_delivered,
                payload=_payload(message.action, request),
            )
        )
        message.next_attempt_at = now + timedelta(seconds=policy.lease_s)
        message.maybe_delivered = True
    session.commit()
    return deliveries


def record_reply(session, delivery, reply, caller):
    """The Queue Service answered: the message is done."""
    now = datetime.now(UTC)
    session.execute(
        delete(OutboxMessage).where(OutboxMessage.id == delivery.message_id)
    )
    row = find_row(session, delivery.request_id, lock=True)
    if delivery.action == ENQUEUE and row.status == PENDING:
        if reply["status"] == CANCELLED:
            row.cancellation = CONFIRMED
            change(session, row, CANCELLED, "appointment-cancelled", caller, now)
        else:
            row.ticket_id, row.queue_position = reply["ticket_id"], reply["position"]
            change(session, row, FORWARDED, "appointment-forwarded", caller, now)
    elif delivery.action == CANCEL and row.cancellation == PENDING:
        row.cancellation = CONFIRMED
        change(session, row, row.status, "appointment-cancel-confirmed", caller, now)
    # Otherwise the request was cancelled while the call ran; the cancel
    # message written then tells the Queue Service.
    session.commit()


def record_failure(
    session, delivery, error, policy, caller, permanent=False, undelivered=False
):
    """An attempt failed: try again later, or give up once the budget is
    spent (at once if the Queue Service refused the request)."""
    now = datetime.now(UTC)
    # The request first, then its messages, as cancelling locks them.
    row = find_row(session, delivery.request_id, lock=True)
    message = session.execute(
        select(OutboxMessage)
        .where(OutboxMessage.id == delivery.message_id)
        .with_for_update()
    ).scalar_one_or_none()
    if message is None:  # cancelled meanwhile
        session.commit()
        return
    # A refusal says the Queue Service holds nothing for this request.
    maybe_delivered = not permanent and (
        delivery.was_maybe_delivered or not undelivered
    )

    if not permanent and message.attempts < policy.max_attempts:
        message.next_attempt_at = now + timedelta(
            seconds=policy.backoff(message.attempts)
        )
        message.last_error = error[:64]
        message.maybe_delivered = maybe_delivered
        session.commit()
        return

    session.delete(message)
    if delivery.action == ENQUEUE and row.status == PENDING:
        row.failure_reason = REFUSED if permanent else EXHAUSTED
        if maybe_delivered:
            # A timed-out attempt may have reached it: ask it to cancel.
            session.flush()
            add_message(session, row.id, CANCEL, now)
            row.cancellation = PENDING
        change(session, row, FAILED, "appointment-failed", caller, now)
    elif delivery.action == CANCEL and row.cancellation == PENDING:
        row.cancellation = FAILED
        change(session, row, row.status, "appointment-cancel-failed", caller, now)
    session.commit()
    log.warning(
        "gave up on %s of appointment request %s after %s attempts (%s)",
        delivery.action,
        delivery.request_id,
        message.attempts,
        error,
    )


def release(session, delivery, wait_s):
    """Hand back a claimed message that was never sent (the circuit is
    open): the attempt does not count."""
    session.execute(
        OutboxMessage.__table__.update()
        .where(OutboxMessage.id == delivery.message_id)
        .values(
            attempts=OutboxMessage.attempts - 1,
            next_attempt_at=datetime.now(UTC) + timedelta(seconds=wait_s),
            maybe_delivered=delivery.was_maybe_delivered,
        )
    )
    session.commit()


def backlog(session):
    """How many calls are owed, how many of them failed at least once (by
    any instance), and how long the oldest has waited."""
    count, failing, oldest = session.execute(
        select(
            func.count(),
            func.count(OutboxMessage.last_error),
            func.min(OutboxMessage.created_at),
        )
    ).one()
    session.rollback()
    waited = (datetime.now(UTC) - oldest).total_seconds() if oldest else 0.0
    return {"owed": count, "failing": failing, "oldest_s": round(waited, 1)}


def _payload(action, request):
    if action == CANCEL:
        return {"request_id": str(request.id)}
    window = None
    if request.preferred_start is not None:
        window = {
            "start": request.preferred_start.isoformat(),
            "end": request.preferred_end.isoformat(),
        }
    return {
        "request_id": str(request.id),
        "patient_id": str(request.patient_id),
        "reason": request.reason,
        "priority": request.priority,
        "modality": request.modality,
        "preferred_window": window,
        "requested_at": request.created_at.isoformat(),
    }
