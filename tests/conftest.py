"""Fixtures: a private PostgreSQL database built by the migrations and a
private RabbitMQ vhost for each test run, and the service on both."""

import eventlet

# Nameko's pytest plugin no longer monkey-patches; psycopg2 and the broker
# client must be green before anything imports them.
eventlet.monkey_patch()

import os  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config as AlembicConfig  # noqa: E402
from kombu import Connection  # noqa: E402
from nameko.containers import ServiceContainer  # noqa: E402
from nameko.standalone.rpc import ClusterRpcProxy  # noqa: E402
from nameko.testing.utils import get_extension  # noqa: E402
from sqlalchemy import create_engine, text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from patient.db import database_url, make_engine  # noqa: E402
from patient.service import PatientService  # noqa: E402
from queue_standin.service import Book, QueueServiceStandIn, TicketBook  # noqa: E402
from tests.http_client import TOKEN_SETTINGS, ApiClient, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The team's real patient files sit beside the repository (CI lays a copy
# there too); PATIENT_DATA points elsewhere.
SHARED_DATA = Path(os.environ.get("PATIENT_DATA", ROOT.parent / "shared" / "data"))
RUN_ID = uuid.uuid4().hex[:8]

ADMIN_DB_URI = os.environ.get(
    "TEST_DB_ADMIN_URI", "postgresql://postgres@127.0.0.1:5432/postgres"
)
RABBIT_URI = os.environ.get("TEST_AMQP_BASE_URI", "amqp://guest:guest@127.0.0.1:5672")
TABLES = (
    "outbox_messages",
    "appointment_requests",
    "patient_identifiers",
    "patient_name_tokens",
    "patient_telecoms",
    "idempotency_records",
    "audit_events",
    "patients",
)

# The Queue Service's deadline, retries and circuit, shortened for tests.
QUEUE_SETTINGS = {
    "QUEUE_CALL_DEADLINE_S": 1,
    "QUEUE_BREAKER_FAILURES": 3,
    "QUEUE_BREAKER_RESET_S": 1,
    "OUTBOX_RELAY_INTERVAL_S": 0.2,
    "FORWARD_BACKOFF_BASE_S": 0.2,
    "FORWARD_BACKOFF_MAX_S": 1,
    "FORWARD_MAX_ATTEMPTS": 4,
}


@pytest.fixture(scope="session")
def db_uri():
    """A new database for this run, migrated to head, dropped afterwards."""
    name = f"patient_test_{RUN_ID}"
    uri = create_database(name)
    yield uri
    drop_database(name)


def create_database(name):
    """Create database ``name``, migrated to head; return its URI."""
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    uri = (
        make_url(ADMIN_DB_URI).set(database=name).render_as_string(hide_password=False)
    )
    migrate(uri, "head")
    return uri


def drop_database(name):
    admin = _admin_engine()
    with admin.connect() as conn:
        conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE datname = :name AND pid <> pg_backend_pid()"
            ),
            {"name": name},
        )
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"'))
    admin.dispose()


def _admin_engine():
    # Not the service's engine: no statement timeout. Creating and dropping
    # a database can take longer than a call may on a busy machine.
    return create_engine(database_url(ADMIN_DB_URI), isolation_level="AUTOCOMMIT")


def migrate(uri, revision):
    config = AlembicConfig(str(ROOT / "alembic.ini"))
    config.attributes["db_uri"] = uri
    if revision == "base":
        command.downgrade(config, revision)
    else:
        command.upgrade(config, revision)


@pytest.fixture(scope="session")
def amqp_uri():
    """A RabbitMQ vhost of this run's own, so that a service running on the
    same broker never takes the tests' calls."""
    vhost = f"patient_test_{RUN_ID}"
    yield create_vhost(vhost)
    rabbitmqctl("delete_vhost", vhost)


def create_vhost(vhost):
    """Create ``vhost`` on the local broker; return its AMQP URI."""
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    return f"{RABBIT_URI}/{vhost}"


def rabbitmqctl(*args):
    subprocess.run(
        ["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60
    )


@pytest.fixture(scope="session")
def config(db_uri, amqp_uri):
    return {
        "AMQP_URI": amqp_uri,
        "DB_URIS": {"patient_service:Base": db_uri},
        "max_workers": 10,
        "MAX_WORKERS": 10,
        "PHONE_REGION": "US",
        "DB_STATEMENT_TIMEOUT_MS": 5000,
        "WEB_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
        "MAX_BODY_BYTES": 1024 * 1024,
        **TOKEN_SETTINGS,
        **QUEUE_SETTINGS,
    }


@pytest.fixture(scope="session")
def engine(db_uri):
    engine = make_engine(db_uri)
    yield engine
    engine.dispose()


@pytest.fixture
def clean_db(engine):
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))


@pytest.fixture
def db(engine, clean_db):
    """A session on the test database, for arranging and checking."""
    with Session(engine) as session:
        yield session


@pytest.fixture(scope="session")
def running_service(config):
    """One service for the whole run: starting and stopping a container
    costs about a second."""
    container = ServiceContainer(PatientService, config)
    container.start()
    yield container
    container.stop()


@pytest.fixture
def service(running_service, clean_db):
    """The running service, on an empty database."""
    return running_service


@pytest.fixture(scope="session")
def session_cluster(config, running_service):
    with ClusterRpcProxy(config, timeout=30) as proxy:
        yield proxy


@pytest.fixture
def cluster(session_cluster, service):
    """A proxy to the running service, with a deadline on every call."""
    return session_cluster


@pytest.fixture
def patients(cluster):
    return cluster.patient_service


@pytest.fixture(scope="session")
def api_base(config, running_service):
    return f"http://{config['WEB_SERVER_ADDRESS']}"


@pytest.fixture
def api(api_base, service):
    """HTTP to the running service, on an empty database."""
    with ApiClient(api_base) as client:
        yield client


class StandIn:
    """The stand-in Queue Service on the tests' broker, started and stopped
    at will; its tickets stay in a file across restarts."""

    def __init__(self, config, path):
        self.config = {**config, "QUEUE_STANDIN_DB": str(path)}
        self.path = path
        self.container = None

    def start(self, **behaviour):
        self.config.update(
            {f"QUEUE_STANDIN_{k.upper()}": v for k, v in behaviour.items()}
        )
        self.container = ServiceContainer(QueueServiceStandIn, self.config)
        self.container.start()
        return self

    def stop(self):
        if self.container is not None:
            self.container.stop()
            self.container = None

    def misbehave(self, **behaviour):
        get_extension(self.container, Book).behaviour.update(behaviour)

    def in_flight(self):
        """Calls it is handling right now (only while told to be slow)."""
        return get_extension(self.container, Book).in_flight

    def report(self):
        """Every request_id it has answered: ticket, status, calls."""
        return TicketBook(str(self.path)).report()


@pytest.fixture
def queue_stand_in(config, tmp_path):
    """The stand-in Queue Service, not yet started."""
    stand_in = StandIn(config, tmp_path / "tickets.db")
    yield stand_in
    stand_in.stop()


@pytest.fixture
def queue_up(queue_stand_in):
    """The stand-in Queue Service, running."""
    return queue_stand_in.start()


@pytest.fixture
def no_queue_service(amqp_uri):
    """No Queue Service has ever run: its queue does not exist."""
    delete_queue(amqp_uri, "rpc-queue_service")


def delete_queue(amqp_uri, name):
    with Connection(amqp_uri) as connection:
        channel = connection.channel()
        try:
            channel.queue_delete(name)
        finally:
            channel.close()


def wait_for(check, timeout=20.0, interval=0.1):
    """Poll ``check`` until it returns something true; fail after
    ``timeout`` seconds with what it last returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"still {result!r} after {timeout}s")
        time.sleep(interval)
