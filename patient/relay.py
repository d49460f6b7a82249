"""Hands the outbox to the Queue Service: right after a request is stored,
and on every tick of the relay for whatever is still owed.

Each attempt is claimed, made and recorded in three steps, with no database
transaction open while the Queue Service is called.
"""

import logging

from patient import outbox
from patient.appointments import CANCEL, ENQUEUE, get_appointment_request
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
            _deliver(session, queue, policy, delivery)
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
    one request at a time, not one of each.
    """
    if queue.circuit == "open":
        return 0
    if queue.circuit != "closed":
        limit = 1
    deliveries = outbox.claim_due(session, policy, limit, now=now)
    for position, delivery in enumerate(deliveries):
        if not _deliver(session, queue, policy, delivery):
            # The circuit opened: hand back the rest unsent.
            for unsent in deliveries[position + 1 :]:
                outbox.release(session, unsent, queue.open_remaining)
            return position
    return len(deliveries)


def _deliver(session, queue, policy, delivery):
    """One attempt; False if the circuit is open."""
    try:
        if delivery.action == ENQUEUE:
            reply = queue.enqueue_appointment(delivery.payload)
        elif delivery.action == CANCEL:
            reply = queue.cancel_appointment(delivery.request_id)
    except CircuitOpen:
        outbox.release(session, delivery, queue.open_remaining)
        return False
    except QueueCallFailed as exc:
        log.warning(
            "%s of appointment request %s failed: %s (attempt %s)",
            delivery.action,
            delivery.request_id,
            exc.error,
            delivery.attempts,
        )
        outbox.record_failure(
            session,
            delivery,
            exc.error,
            policy,
            RELAY,
            permanent=exc.refused,
            undelivered=exc.undelivered,
        )
        return True
    outbox.record_reply(session, delivery, reply, RELAY)
    log.info("%s of appointment request %s done", delivery.action, delivery.request_id)
    return True
