"""The database connection: URL, engine settings and the Nameko dependency."""

import functools
import hashlib
import json
import logging
import re

import psycopg2
from nameko_sqlalchemy import Database
from nameko_sqlalchemy.database import Session
from sqlalchemy import JSON, Uuid, create_engine, event
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from patient.settings import flag

log = logging.getLogger(__name__)

DEFAULT_DB_URI = "postgresql://postgres@127.0.0.1:5432/patient_service"
RECYCLE_S = 600
# Statements a connection keeps prepared: every read and write shape, and
# room for searches combining their parameters in many ways.
MAX_PREPARED = 200


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
        # 0 is no idle timeout: recycle at the usual age, not on every call.
        "pool_recycle": min(RECYCLE_S, idle_ms / 2000) if idle_ms else RECYCLE_S,
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


def prepared(statement):
    """``statement``, run as a PostgreSQL prepared statement: parsed and
    planned once per connection instead of on every call (psycopg2 prepares
    nothing itself). For statements run often, whose planning costs about as
    much as their execution."""
    return statement.execution_options(prepare=True)


def read_first(session, name, sql, parameters):
    """The first row of a fixed read, or None, on a connection of the
    session's pool but outside the session: for calls that read one
    statement and write nothing.

    A primary-key read costs PostgreSQL about 0.1 ms; SQLAlchemy's session,
    statement and result machinery cost more than that, and PostgreSQL's
    parsing and planning about as much again. So the read runs on the bare
    driver connection, without a transaction (no BEGIN, no ROLLBACK), as a
    statement prepared once per connection under ``name``. ``sql`` takes
    psycopg2's ``%(name)s`` placeholders. A failed read drops its connection
    (it may be mid-statement) and raises SQLAlchemy's error, as the
    session would.
    """
    engine, connection = session.bind, None
    try:
        connection = engine.raw_connection()
        driver = connection.driver_connection
        driver.autocommit = True
        with driver.cursor() as cursor:
            statement = _prepare(connection, cursor, name, sql)
            cursor.execute(statement, parameters)
            row = cursor.fetchone()
    except BaseException as exc:
        lost = isinstance(exc, psycopg2.Error) and (
            engine.dialect.is_disconnect(exc, None, None) or _stale_plan(exc)
        )
        if connection is not None and lost:
            # As SQLAlchemy does for a lost connection: every connection
            # opened before it is replaced too, not found dead one by one.
            engine.pool._invalidate(connection, exc)
        elif connection is not None:
            connection.invalidate()
        if isinstance(exc, psycopg2.Error):
            raise DBAPIError.instance(
                sql,
                parameters,
                exc,
                psycopg2.Error,
                hide_parameters=True,
                connection_invalidated=lost,
            ) from exc
        raise
    connection.close()
    return row


def insert_all(session, writes):
    """Insert every ``(table, rows)`` of ``writes`` in one statement, on the
    session's connection and in its transaction: one round trip, where an
    insert a table costs one each and SQLAlchemy's bulk insert machinery
    more than the database's work. Each table's rows are one array a
    column, unnested; every row of a table has the same keys. A constraint
    violation raises ``IntegrityError`` and writes nothing."""
    parts, parameters, casts = [], {}, []
    for number, (table, rows) in enumerate(writes):
        if not rows:
            continue
        columns, arrays = [], []
        for column in rows[0]:
            name = f"t{number}_{column}"
            quoted, array_type, convert = _column_array(table.__table__, column)
            parameters[name] = [convert(row[column]) for row in rows]
            columns.append(quoted)
            arrays.append(f"%({name})s::{array_type}")
            casts.append((name, array_type))
        # Table and column names come from the models' metadata, never from
        # input: a key that names no column fails in _column_array.
        parts.append(
            f"w{number} AS (INSERT INTO {_quote(table.__tablename__)}"  # noqa: S608
            f" ({', '.join(columns)}) SELECT * FROM unnest({', '.join(arrays)}))"
        )
    if parts:
        sql = f"WITH {', '.join(parts)} SELECT 1"
        session.connection().exec_driver_sql(
            sql,
            parameters,
            execution_options={"prepare": True, "prepare_casts": tuple(casts)},
        )


_POSTGRESQL = postgresql.dialect()


def _quote(name):
    return _POSTGRESQL.identifier_preparer.quote(name)


@functools.lru_cache(maxsize=256)
def _column_array(table, column):
    """A column's quoted name, its PostgreSQL array type, and the conversion
    of a Python value to what psycopg2 passes in that array."""
    column_type = table.c[column].type
    # The column's collation applies on insert; a cast takes none.
    bare = column_type.copy()
    if getattr(bare, "collation", None):
        bare.collation = None
    array_type = bare.compile(dialect=_POSTGRESQL) + "[]"
    convert = _same
    if isinstance(column_type, JSON):
        convert = _json_text
    elif isinstance(column_type, Uuid):
        convert = _uuid_text
    return _quote(column), array_type, convert


def _json_text(value):
    # As SQLAlchemy's JSON type writes it: the stored text is what readers
    # get back, byte for byte.
    return None if value is None else json.dumps(value)


def _uuid_text(value):
    return None if value is None else str(value)


def _same(value):
    return value


# psycopg2's placeholders, and its escaped percent sign.
_PLACEHOLDER = re.compile(r"%\(([^)]+)\)s|%%")


def _run_prepared(conn, cursor, statement, parameters, context, executemany):
    """Run a statement marked by ``prepared`` as ``EXECUTE``, named after
    its text."""
    options = context.execution_options
    if executemany or not options.get("prepare"):
        return statement, parameters
    name = "p_" + hashlib.blake2b(statement.encode(), digest_size=10).hexdigest()
    casts = options.get("prepare_casts", ())
    return _prepare(conn.connection, cursor, name, statement, casts), parameters


def _prepare(connection, cursor, name, statement, casts=()):
    """``EXECUTE`` of ``statement`` under ``name``, prepared first on a pool
    connection that has not seen it: the pool forgets what a connection
    prepared when it replaces the connection. ``casts``: ``(parameter,
    type)`` pairs, for arguments whose type PostgreSQL cannot coerce to
    (an array of text to ``uuid[]``)."""
    prepare, execute = prepared_forms(name, statement, casts)
    done = connection.info.setdefault("prepared", set())
    if name not in done:
        if len(done) >= MAX_PREPARED:
            # Searches of many shapes would otherwise grow the server
            # process of a long-lived connection without end.
            cursor.execute("DEALLOCATE ALL")
            done.clear()
        cursor.execute(prepare)
        done.add(name)
    return execute


@functools.lru_cache(maxsize=1024)
def prepared_forms(name, statement, casts):
    """``PREPARE`` and ``EXECUTE`` for a statement with psycopg2's
    placeholders: each distinct name becomes a numbered parameter."""
    order = {}

    def number(match):
        if match.group(1) is None:
            return "%"
        return f"${order.setdefault(match.group(1), len(order) + 1)}"

    prepare = f"PREPARE {name} AS " + _PLACEHOLDER.sub(number, statement)
    cast = dict(casts)
    arguments = ", ".join(
        f"%({key})s::{cast[key]}" if key in cast else f"%({key})s" for key in order
    )
    return prepare, f"EXECUTE {name}({arguments})" if order else f"EXECUTE {name}"


def _stale_plan(exc):
    """A prepared statement whose result columns a migration changed fails
    until the connection prepares it again."""
    return getattr(exc, "pgcode", None) == "0A000" and "cached plan" in str(exc)


def _replace_stale_plans(context):
    # Handled as a lost connection: the caller gets the retryable
    # ServiceUnavailable, and every connection is replaced, so each prepares
    # its statements afresh.
    if _stale_plan(context.original_exception):
        context.is_disconnect = True


def make_engine(uri, config=None):
    engine = create_engine(database_url(uri), **engine_options(config or {}))
    # SQLAlchemy's own isolation setting would cost a statement to undo;
    # psycopg2's autocommit flag is set and cleared without one.
    event.listen(engine, "checkin", _end_autocommit)
    event.listen(engine, "before_cursor_execute", _run_prepared, retval=True)
    event.listen(engine, "handle_error", _replace_stale_plans)
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

    def stop(self):
        self._dispose()

    def kill(self):
        # Nameko kills a container whose stop failed elsewhere, after this
        # extension's stop already ran: disposing twice must not fail.
        self._dispose()

    def _dispose(self):
        engine = self.__dict__.pop("engine", None)
        if engine is not None:
            engine.dispose()

    def worker_teardown(self, worker_ctx):
        # The entrypoint ends the transaction within its deadline; a failure
        # here (the database dropped the connection since) must not reach
        # Nameko, which would kill the service for it.
        try:
            super().worker_teardown(worker_ctx)
        except Exception as exc:
            log.warning("closing a worker's session failed: %s", type(exc).__name__)
