"""Hands the outbox to the Queue Service: right after a request is stored,
and on every tick of the relay for whatever is still owed.

Each attempt is claimed, made and recorded in three steps, with no database
transaction open while the Queue Service is called.
"""

import functools
import logging

import eventlet

from patient import outbox
from patient.appointments import ENQUEUE, get_appointment_request
from patient.caller import Caller
from patient.queue import CircuitOpen, QueueCallFailed

log = logging.getLogger(__name__)

RELAY = Caller(actor="system:outbox-relay", service="patient_service")
BATCH = 20


def forward_now(session, queue, policy, made):
    """Try to forward a request just stored, if a call slot is free and the
    circuit is closed; otherwise the relay will. Return the request as it
    then stands."""
    if queue.circuit != "closed" or not queue.inline.acquire(blocking=False):
        return made
    try:
        for delivery in outbox.claim_due(session, policy, 1, made["request_id"]):
            _record(session, queue, policy, delivery, *_call(queue, delivery))
        return get_appointment_request(session, made["request_id"])
    except Exception as exc:  # it is stored: the relay will forward it
        log.warning(
            "could not forward appointment request %s at once: %s",
            made["request_id"],
            type(exc).__name__,
        )
        session.invalidate()
        return made
    finally:
        queue.inline.release()


def relay_due(session, queue, policy, limit=BATCH, now=None):
    """Forward what is due; return how many messages were attempted.

    While the circuit is open nothing is claimed; when it lets trial calls
    through, one message is the trial, so an outage spends one attempt of
    one request at a time, not one of each. The calls of a batch go side by
    side, so that the batch ends within one deadline, well inside the
    lease; their outcomes are recorded one by one.
    """
    if queue.circuit == "open":
        return 0
    if queue.circuit != "closed":
        limit = 1
    deliveries = outbox.claim_due(session, policy, limit, now=now)
    if not deliveries:
        return 0
    pool = eventlet.GreenPool(len(deliveries))
    outcomes = list(pool.imap(functools.partial(_call, queue), deliveries))
    for delivery, (reply, failure) in zip(deliveries, outcomes, strict=True):
        _record(session, queue, policy, delivery, reply, failure)
    return len(deliveries)


def _call(queue, delivery):
    """One attempt, touching no database: ``(reply, None)`` or ``(None,
    failure)``."""
    try:
        if delivery.action == ENQUEUE:
            return queue.enqueue_appointment(delivery.payload), None
        queue.cancel_appointment(delivery.request_id)
        return None, None
    except QueueCallFailed as exc:
        return None, exc


def _record(session, queue, policy, delivery, reply, failure):
    if isinstance(failure, CircuitOpen):
        outbox.release(session, delivery, queue.open_remaining)
    elif failure is not None:
        log.warning(
            "%s of appointment request %s failed: %s (attempt %s)",
            delivery.action,
            delivery.request_id,
            failure.error,
            delivery.attempts,
        )
        outbox.record_failure(
            session,
            delivery,
            failure.error,
            policy,
            RELAY,
            permanent=failure.refused,
            undelivered=failure.undelivered,
        )
    else:
        outbox.record_reply(session, delivery, reply, RELAY)
        log.info(
            "%s of appointment request %s done", delivery.action, delivery.request_id
        )
