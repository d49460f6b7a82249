"""Fixtures: a private PostgreSQL database built by the migrations and a
private RabbitMQ vhost for each test run, and the service on both."""

import eventlet

# Nameko's pytest plugin no longer monkey-patches; psycopg2 and the broker
# client must be green before anything imports them.
eventlet.monkey_patch()

import os  # noqa: E402
import subprocess  # noqa: E402
import uuid  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from alembic import command  # noqa: E402
from alembic.config import Config as AlembicConfig  # noqa: E402
from nameko.containers import ServiceContainer  # noqa: E402
from nameko.standalone.rpc import ClusterRpcProxy  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402

from patient.db import make_engine  # noqa: E402
from patient.service import PatientService  # noqa: E402

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
    "patient_identifiers",
    "patient_name_tokens",
    "patient_name_prefixes",
    "patient_telecoms",
    "idempotency_records",
    "audit_events",
    "patients",
)


@pytest.fixture(scope="session")
def db_uri():
    """A new database for this run, migrated to head, dropped afterwards."""
    name = f"patient_test_{RUN_ID}"
    admin = make_engine(ADMIN_DB_URI).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    uri = (
        make_url(ADMIN_DB_URI).set(database=name).render_as_string(hide_password=False)
    )

    migrate(uri, "head")
    yield uri

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
    rabbitmqctl("add_vhost", vhost)
    rabbitmqctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    yield f"{RABBIT_URI}/{vhost}"
    rabbitmqctl("delete_vhost", vhost)


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
