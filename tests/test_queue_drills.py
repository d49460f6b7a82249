"""Drills: the Queue Service absent, stopped, slow; two Patient Service
instances; one killed mid-forward; a burst while the Queue Service is down.

They run in a world of their own (database, vhost, instances), since they
start and stop Patient Service instances. Each prints its figures (run with
``-s`` to see them); none asserts a time but "no call hung": every call has
a deadline, and a hang surfaces as ``RpcTimeout``.
"""

import os
import signal
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import eventlet
import pytest
from nameko.containers import ServiceContainer
from nameko.exceptions import RpcTimeout, UnknownService
from nameko.standalone.rpc import ClusterRpcProxy
from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from patient.db import make_engine
from patient.models import AppointmentRequest
from patient.service import PatientService
from tests.conftest import (
    QUEUE_SETTINGS,
    ROOT,
    RUN_ID,
    TABLES,
    create_database,
    create_vhost,
    delete_queue,
    drop_database,
    rabbitmqctl,
    wait_for,
)
from tests.factories import patient
from tests.http_client import TOKEN_SETTINGS, free_port

DEADLINE_S = QUEUE_SETTINGS["QUEUE_CALL_DEADLINE_S"]
# Enough for the whole call: the Queue Service's deadline and the database.
CALLER_TIMEOUT_S = DEADLINE_S + 4
NAMEKO = str(Path(sys.executable).with_name("nameko"))
VISIT = {"reason": "follow-up", "priority": "routine", "modality": "phone"}


@pytest.fixture(scope="module")
def config():
    """A database and vhost of the drills' own, for every fixture here,
    the stand-in Queue Service's included."""
    name = f"patient_drills_{RUN_ID}"
    db_uri = create_database(name)
    amqp_uri = create_vhost(name)
    config = {
        "AMQP_URI": amqp_uri,
        "DB_URIS": {"patient_service:Base": db_uri},
        "max_workers": 10,
        "MAX_WORKERS": 10,
        **QUEUE_SETTINGS,
        **TOKEN_SETTINGS,
        # Drills outlast the tests' small budget on purpose.
        "FORWARD_MAX_ATTEMPTS": 1000,
    }
    yield config
    rabbitmqctl("delete_vhost", name)
    drop_database(name)


@pytest.fixture
def engine(config):
    engine = make_engine(config["DB_URIS"]["patient_service:Base"])
    with engine.begin() as conn:
        conn.execute(text(f"TRUNCATE {', '.join(TABLES)}"))
    yield engine
    engine.dispose()


@pytest.fixture
def instances(config, engine):
    """Starts Patient Service instances in this process; stops them all."""
    started = []

    def start():
        # Each instance listens for HTTP on a port of its own.
        address = f"127.0.0.1:{free_port()}"
        container = ServiceContainer(
            PatientService, {**config, "WEB_SERVER_ADDRESS": address}
        )
        container.start()
        started.append(container)
        return container

    yield start
    for container in started:
        container.stop()


@pytest.fixture
def stand_in(queue_stand_in):
    return queue_stand_in


@pytest.fixture
def rpc(config):
    with ClusterRpcProxy(config, timeout=CALLER_TIMEOUT_S) as proxy:
        yield proxy.patient_service


def timed(call, *args):
    started = time.perf_counter()
    result = call(*args)
    return result, time.perf_counter() - started


def request_many(rpc, patient_id, count, prefix):
    """``count`` keyed requests, one after another; their ids and the
    slowest answer."""
    ids, slowest = [], 0.0
    for n in range(count):
        made, took = timed(rpc.request_appointment, patient_id, VISIT, f"{prefix}-{n}")
        ids.append(made["request_id"])
        slowest = max(slowest, took)
    return ids, slowest


def forwarded(engine, ids):
    with Session(engine) as session:
        rows = session.execute(
            select(AppointmentRequest.id, AppointmentRequest.ticket_id).where(
                AppointmentRequest.status == "forwarded"
            )
        ).all()
    tickets = {str(row.id): row.ticket_id for row in rows}
    return tickets if set(ids) <= set(tickets) else None


def start_and_forward(stand_in, engine, ids):
    """Start the stand-in; wait until every request is forwarded; return
    the stand-in's report and how long that took."""
    started = time.perf_counter()
    stand_in.start()
    tickets = wait_for(lambda: forwarded(engine, ids), timeout=60)
    return assert_each_held_once(stand_in, tickets), time.perf_counter() - started


def assert_each_held_once(stand_in, tickets):
    """The stand-in holds each request once, under the ticket the Patient
    Service recorded."""
    report = stand_in.report()
    for request_id, ticket_id in tickets.items():
        assert report[request_id]["status"] == "queued"
        assert report[request_id]["ticket_id"] == ticket_id
    assert len({held["ticket_id"] for held in report.values()}) == len(report)
    return report


def figures(drill, **measured):
    shown = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
        for k, v in measured.items()
    )
    print(f"\nDRILL {drill}: {shown}")


def test_drill_1_requests_wait_for_a_queue_service_that_never_started(
    config, engine, instances, stand_in, rpc
):
    delete_queue(config["AMQP_URI"], "rpc-queue_service")
    instances()
    someone = rpc.register_patient(patient())

    ids, slowest = request_many(rpc, someone["id"], 20, "never")
    assert all(rpc.get_appointment_request(i)["status"] == "pending" for i in ids)

    report, took = start_and_forward(stand_in, engine, ids)

    assert all(report[i]["calls"] == 1 for i in ids)
    figures(
        1,
        requests=len(ids),
        slowest_request_s=slowest,
        all_forwarded_after_start_s=took,
    )


def test_drill_2_a_stopped_queue_service_delays_nothing_and_loses_nothing(
    config, engine, instances, stand_in, rpc
):
    instances()
    someone = rpc.register_patient(patient())
    stand_in.start()
    stand_in.stop()  # its queue stays, with nobody to take the requests

    reads_before = [timed(rpc.get_patient, someone["id"])[1] for _ in range(50)]
    ids, slowest = request_many(rpc, someone["id"], 20, "stopped")
    reads_during = [timed(rpc.get_patient, someone["id"])[1] for _ in range(50)]
    assert all(rpc.get_appointment_request(i)["status"] == "pending" for i in ids)

    stand_in.start()
    tickets = wait_for(lambda: forwarded(engine, ids), timeout=30)
    report = assert_each_held_once(stand_in, tickets)
    figures(
        2,
        requests=len(ids),
        slowest_request_s=slowest,
        deadline_s=float(DEADLINE_S),
        get_patient_median_before_ms=statistics.median(reads_before) * 1000,
        get_patient_median_during_ms=statistics.median(reads_during) * 1000,
        calls_at_stand_in=sum(report[i]["calls"] for i in ids),
    )


def test_drill_3_a_queue_service_slower_than_the_deadline_is_retried(
    config, engine, instances, stand_in, rpc
):
    instances()
    someone = rpc.register_patient(patient())
    stand_in.start(delay_s=DEADLINE_S * 1.5)

    ids, slowest = request_many(rpc, someone["id"], 5, "slow")
    # Every attempt ends past the deadline: still pending, tried again.
    wait_for(
        lambda: all(stand_in.report().get(i, {}).get("calls", 0) >= 2 for i in ids),
        timeout=30,
    )
    assert all(rpc.get_appointment_request(i)["status"] == "pending" for i in ids)

    stand_in.misbehave(delay_s=0)
    tickets = wait_for(lambda: forwarded(engine, ids), timeout=30)
    report = assert_each_held_once(stand_in, tickets)
    figures(
        3,
        requests=len(ids),
        slowest_request_s=slowest,
        calls_per_request=sorted(report[i]["calls"] for i in ids),
    )


def test_drill_4_two_instances_forward_each_of_200_requests_once(
    config, engine, instances, stand_in, rpc
):
    delete_queue(config["AMQP_URI"], "rpc-queue_service")
    instances(), instances()
    someone = rpc.register_patient(patient())

    ids, _ = request_many(rpc, someone["id"], 200, "pair")
    report, took = start_and_forward(stand_in, engine, ids)

    # Never forwarded twice, not even at the same time by both instances.
    assert all(report[i]["calls"] == 1 for i in ids)
    figures(4, requests=len(ids), all_forwarded_after_start_s=took)


def test_drill_5_an_instance_killed_mid_forward_loses_and_doubles_nothing(
    config, engine, stand_in, rpc
):
    stand_in.start(delay_s=0.5)
    service = start_process(config)
    someone = rpc.register_patient(patient())

    # Requests in flight, each waiting on the slow Queue Service, when the
    # process is killed: callers time out and retry with their keys.
    pool = eventlet.GreenPool(10)
    calls = [
        pool.spawn(request_once, config, someone["id"], f"kill-{n}") for n in range(10)
    ]
    eventlet.sleep(0.3)
    service.send_signal(signal.SIGKILL)
    service.wait()
    answered = [made for made, _ in (c.wait() for c in calls)]
    service = start_process(config)
    try:
        ids = [
            rpc.request_appointment(someone["id"], VISIT, f"kill-{n}")["request_id"]
            for n in range(10)
        ]
        tickets = wait_for(lambda: forwarded(engine, ids), timeout=60)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=30)

    report = assert_each_held_once(stand_in, tickets)
    with Session(engine) as session:
        stored = session.scalar(select(func.count()).select_from(AppointmentRequest))
    assert stored == len(set(ids)) == 10
    figures(
        5,
        requests=10,
        answered_before_kill=sum(a is not None for a in answered),
        stored=stored,
        calls_per_request=sorted(report[i]["calls"] for i in ids),
    )


def test_drill_6_a_burst_while_the_queue_service_is_down_never_hangs(
    config, engine, instances, stand_in, rpc
):
    instances()
    someone = rpc.register_patient(patient())
    stand_in.start()
    stand_in.stop()

    pool = eventlet.GreenPool(50)
    started = datetime.now(UTC)
    results = list(
        pool.imap(
            lambda n: request_once(config, someone["id"], f"burst-{n}"), range(50)
        )
    )
    took = [t for _, t in results]

    assert all(made is not None for made, _ in results), "a call hung"
    assert {made["status"] for made, _ in results} == {"pending"}
    figures(
        6,
        calls=50,
        max_workers=config["max_workers"],
        slowest_s=max(took),
        median_s=statistics.median(took),
        wall_s=(datetime.now(UTC) - started).total_seconds(),
    )


def request_once(config, patient_id, key):
    """One request from a caller of its own: the answer (None if the call
    timed out) and how long the call took."""
    with ClusterRpcProxy(config, timeout=CALLER_TIMEOUT_S) as proxy:
        started = time.perf_counter()
        try:
            made = proxy.patient_service.request_appointment(patient_id, VISIT, key)
        except RpcTimeout:
            made = None
        return made, time.perf_counter() - started


def start_process(config):
    """The service as operators run it, in a process of its own."""
    env = {
        **os.environ,
        "AMQP_URI": config["AMQP_URI"],
        "DB_URI": config["DB_URIS"]["patient_service:Base"],
        "LOG_LEVEL": "WARNING",
        "WEB_SERVER_ADDRESS": f"127.0.0.1:{free_port()}",
        "JWT_SECRET": TOKEN_SETTINGS["JWT_SECRET"],
        **{k: str(v) for k, v in QUEUE_SETTINGS.items()},
        "FORWARD_MAX_ATTEMPTS": "1000",
    }
    process = subprocess.Popen(
        [NAMEKO, "run", "--config", "config.yml", "patient.service"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
    )
    with ClusterRpcProxy(config, timeout=1) as proxy:

        def answers():
            try:
                return proxy.patient_service.ping() == "pong"
            except (RpcTimeout, UnknownService):  # not consuming yet
                return False

        wait_for(answers, timeout=30)
    return process
