"""Checks of what the service depends on, for ``health()``."""

import time

import eventlet
from kombu import Connection
from sqlalchemy import text

from patient import outbox


def report(session, amqp_uri, call_deadline_s, queue):
    """What ``health()`` and ``GET /health`` answer."""
    checks = {
        # Half the call's deadline: health answers "down", not a timeout.
        "database": database_status(session, min(2.0, call_deadline_s / 2)),
        "broker": broker_status(amqp_uri),
    }
    # Never "down" for the Queue Service: requests wait in the outbox.
    queue_service = queue_status(session, queue)
    return {"status": overall(checks), **checks, "queue_service": queue_service}


def database_status(session, timeout=2.0):
    started = time.perf_counter()
    try:
        with eventlet.Timeout(timeout):
            session.execute(text("SELECT 1"))
            session.rollback()
    except eventlet.Timeout:
        # A database that stopped answering: drop the connection, unread.
        session.invalidate()
        return {"status": "down", "error": "Timeout"}
    except Exception as exc:
        session.invalidate()
        return {"status": "down", "error": type(exc).__name__}
    return {"status": "up", "latency_ms": _ms_since(started)}


def broker_status(amqp_uri, timeout=2.0):
    # Known shortcoming: a new AMQP connection on every call. Asking the
    # running consumer's connection would be cheaper; over RPC the answer is
    # "up" anyway, since the call itself came through the broker.
    started = time.perf_counter()
    try:
        with Connection(amqp_uri, connect_timeout=timeout) as connection:
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        return {"status": "down", "error": type(exc).__name__}
    return {"status": "up", "latency_ms": _ms_since(started)}


def queue_status(session, queue, stale_s=60.0):
    """``degraded`` while this instance's circuit to the Queue Service is
    open, a call owed to it has failed (in any instance), or one has been
    owed longer than ``stale_s``; never ``down``."""
    status = {"circuit": queue.circuit}
    try:
        with eventlet.Timeout(2.0):
            status.update(outbox.backlog(session))
    except (Exception, eventlet.Timeout) as exc:
        session.invalidate()
        return {"status": "degraded", **status, "backlog_error": type(exc).__name__}
    healthy = (
        queue.circuit != "open"
        and status["failing"] == 0
        and status["oldest_s"] <= stale_s
    )
    return {"status": "up" if healthy else "degraded", **status}


def overall(checks):
    return "ok" if all(c["status"] == "up" for c in checks.values()) else "down"


def _ms_since(started):
    return round((time.perf_counter() - started) * 1000, 2)
