"""A stand-in ``queue_service``: NOT the Queue Service.

It honours the contract the Patient Service relies on (README, "The Queue
Service contract"): ``enqueue_appointment`` and ``cancel_appointment``, both
de-duplicated by ``request_id``, a cancellation remembered even when it
arrives before its request. It keeps its tickets in a SQLite file, so a
restart keeps them, and it can be told to be slow, to fail or to refuse, so
that the Patient Service can be tried against a misbehaving Queue Service.

    nameko run --config config.yml queue_standin.service
"""

import logging
import sqlite3
import uuid

import eventlet
from eventlet.semaphore import Semaphore
from nameko.extensions import DependencyProvider
from nameko.rpc import rpc

log = logging.getLogger(__name__)

PRIORITIES = ("routine", "urgent")
MODALITIES = ("video", "phone", "in_person")


class InvalidAppointmentRequest(Exception):
    """The request breaks the contract: the Patient Service must not retry."""


class StandInFailure(Exception):
    """Told to fail: stands for a crash inside the Queue Service."""


SCHEMA = """
CREATE TABLE IF NOT EXISTS tickets (
    request_id TEXT PRIMARY KEY,
    ticket_id TEXT,
    status TEXT NOT NULL,
    priority TEXT,
    calls INTEGER NOT NULL DEFAULT 0,
    cancel_calls INTEGER NOT NULL DEFAULT 0
);
"""


class TicketBook:
    """The tickets, in SQLite, one transaction per change."""

    def __init__(self, path):
        self.lock = Semaphore()
        self.conn = sqlite3.connect(path, check_same_thread=False)
        self.conn.executescript(SCHEMA)

    def enqueue(self, request_id, priority):
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT INTO tickets (request_id, ticket_id, status, priority)"
                " VALUES (?, ?, 'queued', ?) ON CONFLICT (request_id) DO NOTHING",
                (request_id, f"T-{uuid.uuid4().hex[:12]}", priority),
            )
            self.conn.execute(
                "UPDATE tickets SET calls = calls + 1 WHERE request_id = ?",
                (request_id,),
            )
            ticket_id, status = self.conn.execute(
                "SELECT ticket_id, status FROM tickets WHERE request_id = ?",
                (request_id,),
            ).fetchone()
            (ahead,) = self.conn.execute(
                "SELECT count(*) FROM tickets WHERE status = 'queued'"
                " AND rowid < (SELECT rowid FROM tickets WHERE request_id = ?)",
                (request_id,),
            ).fetchone()
        if status == "cancelled":
            return {"status": "cancelled", "ticket_id": ticket_id, "position": None}
        return {"status": "queued", "ticket_id": ticket_id, "position": ahead + 1}

    def cancel(self, request_id):
        # A cancellation that comes first is kept: the late request it
        # cancels is then answered as cancelled, never queued.
        with self.lock, self.conn:
            self.conn.execute(
                "INSERT INTO tickets (request_id, status) VALUES (?, 'cancelled')"
                " ON CONFLICT (request_id) DO UPDATE SET status = 'cancelled'",
                (request_id,),
            )
            self.conn.execute(
                "UPDATE tickets SET cancel_calls = cancel_calls + 1"
                " WHERE request_id = ?",
                (request_id,),
            )
        return {"request_id": request_id, "status": "cancelled"}

    def report(self):
        with self.lock:
            rows = self.conn.execute(
                "SELECT request_id, ticket_id, status, calls, cancel_calls FROM tickets"
            ).fetchall()
        return {
            request_id: {
                "ticket_id": ticket_id,
                "status": status,
                "calls": calls,
                "cancel_calls": cancel_calls,
            }
            for request_id, ticket_id, status, calls, cancel_calls in rows
        }


class Book(DependencyProvider):
    def setup(self):
        config = self.container.config
        self.book = TicketBook(config.get("QUEUE_STANDIN_DB", "queue-standin.db"))
        # How to misbehave; changed at run time by ``misbehave``.
        self.behaviour = {
            "delay_s": float(config.get("QUEUE_STANDIN_DELAY_S", 0)),
            "failing": False,
            "fail_next": 0,
            "refusing": False,
        }
        # Calls being handled right now, for drills that kill a caller
        # mid-call.
        self.in_flight = 0

    def get_dependency(self, worker_ctx):
        return self


class QueueServiceStandIn:
    # Known shortcoming: a reply that cannot be sent because the broker went
    # away kills this stand-in, as it does any plain Nameko service
    # (docker-compose restarts it). An entrypoint that survives failed
    # replies, as the Patient Service's does, would fix it.
    name = "queue_service"

    tickets = Book()

    @rpc(expected_exceptions=(InvalidAppointmentRequest, StandInFailure))
    def enqueue_appointment(self, request):
        self._act()
        request_id, priority = _check(request, self.tickets.behaviour["refusing"])
        return self.tickets.book.enqueue(request_id, priority)

    @rpc(expected_exceptions=(InvalidAppointmentRequest, StandInFailure))
    def cancel_appointment(self, request_id):
        self._act()
        if not _is_uuid(request_id):
            raise InvalidAppointmentRequest("request_id must be a UUID")
        return self.tickets.book.cancel(request_id)

    @rpc
    def misbehave(self, delay_s=None, failing=None, fail_next=None, refusing=None):
        """Stand-in only: be slow (``delay_s``), fail every call
        (``failing``) or the next ``fail_next`` calls, or refuse every
        request (``refusing``)."""
        behaviour = self.tickets.behaviour
        for key, value in (
            ("delay_s", delay_s),
            ("failing", failing),
            ("fail_next", fail_next),
            ("refusing", refusing),
        ):
            if value is not None:
                behaviour[key] = value
        return dict(behaviour)

    @rpc
    def report(self):
        """Stand-in only: every request_id seen, with its ticket, status and
        how many calls it took."""
        return self.tickets.book.report()

    def _act(self):
        behaviour = self.tickets.behaviour
        if behaviour["delay_s"]:
            self.tickets.in_flight += 1
            try:
                eventlet.sleep(behaviour["delay_s"])
            finally:
                self.tickets.in_flight -= 1
        if behaviour["fail_next"] > 0:
            behaviour["fail_next"] -= 1
            raise StandInFailure("told to fail")
        if behaviour["failing"]:
            raise StandInFailure("told to fail")


def _check(request, refusing):
    if not isinstance(request, dict) or not _is_uuid(request.get("request_id")):
        raise InvalidAppointmentRequest("request_id must be a UUID")
    if refusing:
        raise InvalidAppointmentRequest("told to refuse")
    if request.get("priority") not in PRIORITIES:
        raise InvalidAppointmentRequest("unknown priority")
    if request.get("modality") not in MODALITIES:
        raise InvalidAppointmentRequest("unknown modality")
    if not isinstance(request.get("reason"), str) or not request["reason"]:
        raise InvalidAppointmentRequest("reason is required")
    return request["request_id"], request["priority"]


def _is_uuid(value):
    try:
        uuid.UUID(value)
    except (TypeError, ValueError, AttributeError):
        return False
    return True
