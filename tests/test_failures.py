"""A database that stops answering, lock waits and crossing writes: calls
end within their deadline with a typed error, and nothing deadlocks."""

import time
import uuid

import eventlet
import pytest
from nameko.containers import ServiceContainer
from nameko.standalone.rpc import ClusterRpcProxy
from sqlalchemy import func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session

from drills.relay import Relay
from patient.db import make_engine
from patient.errors import DuplicatePatient, ServiceUnavailable
from patient.models import Patient, PatientIdentifier
from patient.service import PatientService
from tests.factories import patient
from tests.http_client import ApiClient, free_port, token


class StallingPatientService(PatientService):
    name = "patient_service_behind_proxy"


@pytest.fixture
def proxy(db_uri):
    relay = Relay(make_url(db_uri).port or 5432)
    yield relay
    relay.paused = False
    relay.close()


@pytest.fixture
def stalling(config, db_uri, proxy, clean_db):
    """The service on a database reached through the proxy, with a 2 s
    deadline and a 1 s statement timeout."""
    uri = make_url(db_uri).set(host="127.0.0.1", port=proxy.port)
    container = ServiceContainer(
        StallingPatientService,
        {
            **config,
            "DB_URIS": {
                "patient_service_behind_proxy:Base": uri.render_as_string(
                    hide_password=False
                )
            },
            "CALL_DEADLINE_S": 2,
            "DB_STATEMENT_TIMEOUT_MS": 1000,
            # Its own port: a second listener on one port shares its traffic.
            "WEB_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
        },
    )
    container.start()
    with ClusterRpcProxy(config, timeout=20) as cluster:
        yield cluster.patient_service_behind_proxy
    proxy.paused = False
    container.stop()


def timed(call, *args):
    started = time.monotonic()
    try:
        return call(*args), time.monotonic() - started
    except Exception as exc:
        return exc, time.monotonic() - started


def test_a_database_that_stops_answering_fails_calls_within_the_deadline(
    stalling, proxy, config
):
    stored = stalling.register_patient(patient())
    proxy.paused = True

    error, took = timed(stalling.get_patient, stored["id"])
    assert isinstance(error, ServiceUnavailable)
    assert "in time" in str(error)
    assert took < 4

    report, took = timed(stalling.health)
    assert report["status"] == "down" and report["database"]["status"] == "down"
    assert took < 3

    # More stuck calls than workers: each ends at its deadline, and a call
    # that needs no database is answered meanwhile.
    def get(_):
        with ClusterRpcProxy(config, timeout=20) as cluster:
            return timed(cluster.patient_service_behind_proxy.get_patient, stored["id"])

    pool = eventlet.GreenPool(12)
    results = list(pool.imap(get, range(12)))
    assert all(isinstance(error, ServiceUnavailable) for error, _ in results)
    assert max(took for _, took in results) < 8
    assert timed(stalling.ping)[1] < 3

    proxy.paused = False
    assert stalling.get_patient(stored["id"]) == stored


def test_a_lock_held_too_long_is_a_retryable_unavailability(stalling, engine):
    stored = stalling.register_patient(patient())

    with Session(engine) as holder:
        holder.execute(
            text("SELECT 1 FROM patients WHERE id = :id FOR UPDATE"),
            {"id": stored["id"]},
        )
        error, took = timed(stalling.update_patient, stored["id"], stored, 1)
        holder.rollback()

    assert isinstance(error, ServiceUnavailable)
    assert "in time" in str(error)
    assert took < 3
    assert stalling.update_patient(stored["id"], stored, 1)["meta"]["versionId"] == "2"


def test_batches_sharing_identifiers_in_opposite_orders_never_deadlock(
    config, service, db
):
    shared = [patient() for _ in range(30)]

    def send(entries):
        with ClusterRpcProxy(config, timeout=30) as cluster:
            return cluster.patient_service.register_patients(entries)

    for _ in range(3):
        for resource in shared:
            resource["identifier"][0]["value"] += "x"
        forward = [{"resource": r} for r in shared]
        pool = eventlet.GreenPool(2)
        first, second = pool.imap(send, [forward, forward[::-1]])

        statuses = [r["status"] for r in first + second]
        assert statuses.count("created") == 30
        assert statuses.count("duplicate") == 30

    db.rollback()
    assert db.execute(select(func.count()).select_from(Patient)).scalar_one() == 90
    per_identifier = db.execute(
        select(func.count())
        .select_from(PatientIdentifier)
        .group_by(PatientIdentifier.value)
    ).scalars()
    assert set(per_identifier) == {1}


def test_connections_dropped_by_the_database_under_load_are_survived(
    config, service, patients, engine
):
    stored = patients.register_patient(patient())
    stop = time.monotonic() + 3

    def read(_):
        outcomes = []
        with ClusterRpcProxy(config, timeout=20) as cluster:
            while time.monotonic() < stop:
                try:
                    cluster.patient_service.get_patient(stored["id"])
                    outcomes.append("ok")
                except ServiceUnavailable:
                    outcomes.append("unavailable")
        return outcomes

    pool = eventlet.GreenPool(6)
    readers = [pool.spawn(read, n) for n in range(6)]
    for _ in range(5):
        eventlet.sleep(0.4)
        with engine.begin() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                    " WHERE application_name = 'patient_service'"
                    " AND datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
    outcomes = [o for reader in readers for o in reader.wait()]

    assert outcomes.count("ok") > 0
    assert patients.ping() == "pong"
    assert patients.get_patient(stored["id"]) == stored


def test_connections_beyond_the_working_set_close_when_idle(db_uri, engine):
    pool = make_engine(db_uri, {"MAX_WORKERS": 3, "DB_IDLE_TIMEOUT_S": 1})
    burst = [pool.connect() for _ in range(5)]
    pids = [
        conn.execute(text("SELECT pg_backend_pid()")).scalar_one() for conn in burst
    ]
    for conn in burst:
        conn.close()

    def still_open():
        with engine.connect() as conn:
            return conn.execute(
                text("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(:pids)"),
                {"pids": pids},
            ).scalar_one()

    # One caller at a time, as a light load after the burst.
    give_up = time.monotonic() + 15
    while still_open() > 1 and time.monotonic() < give_up:
        with pool.connect() as conn:
            assert conn.execute(text("SELECT 1")).scalar_one() == 1
        eventlet.sleep(0.2)

    assert still_open() <= 1
    with pool.connect() as conn:
        assert conn.execute(text("SELECT 1")).scalar_one() == 1
    pool.dispose()


def test_updates_swapping_identifiers_never_deadlock(config, service, patients):
    for _ in range(10):
        one = patients.register_patient(patient())
        two = patients.register_patient(patient())

        def swap(pair):
            mine, theirs = pair
            with ClusterRpcProxy(config, timeout=20) as cluster:
                try:
                    cluster.patient_service.update_patient(
                        mine["id"], {**mine, "identifier": theirs["identifier"]}, 1
                    )
                    return "updated"
                except DuplicatePatient:
                    return "duplicate"
                except ServiceUnavailable:
                    return "unavailable"

        outcomes = list(eventlet.GreenPool(2).imap(swap, [(one, two), (two, one)]))
        assert "unavailable" not in outcomes


def test_a_batch_too_slow_for_the_deadline_says_so(stalling, db):
    # 20 names of 99 given names each: thousands of search keys a patient.
    many_names = [
        {"family": f"F{n}", "given": [f"g{n}x{k} h{n}y{k}" for k in range(99)]}
        for n in range(20)
    ]
    entries = [{"resource": patient(name=many_names)} for _ in range(40)]

    error, took = timed(stalling.register_patients, entries)

    assert isinstance(error, ServiceUnavailable)
    assert "in time" in str(error)
    assert took < 5
    db.rollback()
    assert db.execute(select(func.count()).select_from(Patient)).scalar_one() == 0


class UnreachableDatabaseService(PatientService):
    name = "patient_service_without_database"


@pytest.fixture
def http_without_database(config):
    """The service over HTTP with its database on a port nobody listens on."""
    address = f"127.0.0.1:{free_port()}"
    container = ServiceContainer(
        UnreachableDatabaseService,
        {
            **config,
            "DB_URIS": {
                "patient_service_without_database:Base": (
                    f"postgresql://postgres@127.0.0.1:{free_port()}/nothing"
                )
            },
            "WEB_SERVER_ADDRESS": address,
        },
    )
    container.start()
    with ApiClient(f"http://{address}") as client:
        yield client
    container.stop()


def test_over_http_an_unreachable_database_is_503_and_health_says_so(
    http_without_database,
):
    clinician = token("clinician")

    read = http_without_database.get(f"/patients/{uuid.uuid4()}", as_=clinician)
    write = http_without_database.post("/patients", as_=clinician, json=patient())
    health = http_without_database.get("/health")

    for response in (read, write):
        assert response.status_code == 503
        assert response.headers["Content-Type"] == "application/problem+json"
        assert response.json()["code"] == "service-unavailable"
        assert response.headers["Retry-After"]
    assert health.status_code == 503
    assert health.json()["database"]["status"] == "down"
    assert health.json()["broker"]["status"] == "up"
