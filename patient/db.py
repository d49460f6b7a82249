"""The database connection: URL, engine settings and the Nameko dependency."""

import logging

from nameko_sqlalchemy import Database
from nameko_sqlalchemy.database import Session
from sqlalchemy import create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import sessionmaker

from patient.settings import flag

log = logging.getLogger(__name__)

DEFAULT_DB_URI = "postgresql://postgres@127.0.0.1:5432/patient_service"
RECYCLE_S = 600


def database_url(uri):
    """Accept a plain ``postgresql://`` URL and name the installed driver.

    SQLAlchemy 2.1 reads a plain URL as psycopg 3; this service ships
    psycopg2.
    """
    url = make_url(uri)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg2")
    return url


def engine_options(config):
    """Pool and timeouts from the service config.

    The pool holds a connection for every worker, so a full house of workers
    never waits for one; statement and connect timeouts bound every call.
    After a burst, PostgreSQL closes the connections left idle longer than
    ``DB_IDLE_TIMEOUT_S``: the pool hands out the most recently used ones
    first, so only those beyond the working set sit idle, and a connection
    is recycled before it could have idled that long.
    """
    workers = int(config.get("MAX_WORKERS", 10))
    statement_ms = int(config.get("DB_STATEMENT_TIMEOUT_MS", 5000))
    idle_ms = int(float(config.get("DB_IDLE_TIMEOUT_S", 60)) * 1000)
    return {
        "pool_size": workers + 2,
        "max_overflow": 0,
        "pool_timeout": float(config.get("DB_POOL_TIMEOUT_S", 5)),
        # Most recently used first: after a burst only the connections
        # beyond the working set sit idle, and PostgreSQL closes them.
        "pool_use_lifo": True,
        # A ping before every call is a round trip on every call. Without
        # it a connection the database dropped fails the one call that
        # finds it (ServiceUnavailable, retryable) and SQLAlchemy then
        # replaces every connection opened before. Recycling before the
        # idle timeout keeps a connection PostgreSQL closed for idling
        # from ever being handed out.
        "pool_pre_ping": flag(config.get("DB_POOL_PRE_PING", False)),
        "pool_recycle": min(RECYCLE_S, idle_ms / 2000),
        "hide_parameters": True,
        "connect_args": {
            "connect_timeout": int(config.get("DB_CONNECT_TIMEOUT_S", 3)),
            "application_name": "patient_service",
            "options": f"-c statement_timeout={statement_ms}"
            f" -c idle_in_transaction_session_timeout={statement_ms * 6}"
            f" -c idle_session_timeout={idle_ms}",
        },
    }


def read_only(session):
    """Run the session's reads without a transaction: no BEGIN and no
    ROLLBACK, two round trips fewer for a call that reads one statement.
    Call before the session's first statement, and only in a call that
    writes nothing afterwards: on the autocommit connection a later write
    would have no transaction (a savepoint fails). The connection is in a
    transaction again once it goes back to the pool."""
    session.connection().connection.dbapi_connection.autocommit = True


def make_engine(uri, config=None):
    engine = create_engine(database_url(uri), **engine_options(config or {}))
    # SQLAlchemy's own isolation setting would cost a statement to undo;
    # psycopg2's autocommit flag is set and cleared without one.
    event.listen(engine, "checkin", _end_autocommit)
    return engine


def _end_autocommit(dbapi_connection, record):
    if dbapi_connection is not None and not dbapi_connection.closed:
        dbapi_connection.autocommit = False


class PatientDatabase(Database):
    """nameko-sqlalchemy's ``Database`` with its engine built from config.

    nameko-sqlalchemy 1.5 takes engine options only from its constructor and
    passes the URL to SQLAlchemy unchanged; this reads both from the
    service's config instead.
    """

    def setup(self):
        service_name = self.container.service_name
        key = f"{service_name}:{self.declarative_base.__name__}"
        self.db_uri = self.container.config["DB_URIS"][key]
        self.engine = make_engine(self.db_uri, self.container.config)
        self.Session = sessionmaker(
            bind=self.engine, class_=Session, expire_on_commit=False
        )

    def worker_teardown(self, worker_ctx):
        # The entrypoint ends the transaction within its deadline; a failure
        # here (the database dropped the connection since) must not reach
        # Nameko, which would kill the service for it.
        try:
            super().worker_teardown(worker_ctx)
        except Exception as exc:
            log.warning("closing a worker's session failed: %s", type(exc).__name__)
