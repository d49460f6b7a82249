"""Checks of what the service depends on, for ``health()``."""

import time

import eventlet
from kombu import Connection
from sqlalchemy import text


def report(session, amqp_uri, call_deadline_s):
    """What ``health()`` and ``GET /health`` answer."""
    checks = {
        # Half the call's deadline: health answers "down", not a timeout.
        "database": database_status(session, min(2.0, call_deadline_s / 2)),
        "broker": broker_status(amqp_uri),
    }
    return {"status": overall(checks), **checks}


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


def overall(checks):
    return "ok" if all(c["status"] == "up" for c in checks.values()) else "down"


def _ms_since(started):
    return round((time.perf_counter() - started) * 1000, 2)
