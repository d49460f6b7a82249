"""Checks of what the service depends on, for ``health()``."""

import time

from kombu import Connection
from sqlalchemy import text


def database_status(session):
    started = time.perf_counter()
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        return {"status": "down", "error": type(exc).__name__}
    finally:
        session.rollback()
    return {"status": "up", "latency_ms": _ms_since(started)}


def broker_status(amqp_uri, timeout=2.0):
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
