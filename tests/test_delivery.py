"""At-least-once delivery: a message delivered twice writes once."""

import bz2
import json
import uuid
from datetime import UTC, datetime, timedelta
from unittest import mock

import eventlet
import pytest
from kombu import Connection, Exchange, Queue
from nameko.exceptions import RpcTimeout
from nameko.standalone.rpc import ClusterRpcProxy
from sqlalchemy import func, select

from patient.dependencies import Replier
from patient.models import AuditEvent, IdempotencyRecord, Patient
from patient.records import purge_delivery_records
from tests.factories import patient


def call_twice(amqp_uri, method, args):
    """Publish one RPC request twice, with one correlation id, as a broker
    does when it redelivers; return both replies."""
    body = json.dumps({"args": args, "kwargs": {}})
    return call_raw(amqp_uri, method, body, times=2)


def call_raw(amqp_uri, method, body, times=1, **properties):
    """Publish ``body`` as it is, ``times`` times with one correlation id;
    return the replies."""
    correlation_id = str(uuid.uuid4())
    exchange = Exchange("nameko-rpc", type="topic", durable=True)
    name = f"test-replies-{correlation_id}"
    # Nameko sends replies through its RPC exchange, keyed by reply_to.
    reply_queue = Queue(
        name, exchange, routing_key=name, exclusive=True, auto_delete=True
    )
    replies = []
    collect = lambda body, message: replies.append(body)  # noqa: E731
    with (
        Connection(amqp_uri) as conn,
        conn.Consumer(reply_queue, callbacks=[collect]) as consumer,
    ):
        consumer.consume()
        producer = conn.Producer(exchange=exchange)
        for _ in range(times):
            producer.publish(
                body,
                routing_key=f"patient_service.{method}",
                correlation_id=correlation_id,
                reply_to=reply_queue.name,
                content_type="application/json",
                declare=[reply_queue],
                **properties,
            )
        while len(replies) < times:
            conn.drain_events(timeout=10)
    return [r if isinstance(r, dict) else json.loads(r) for r in replies]


def test_a_redelivered_registration_creates_one_patient(config, service, db):
    first, second = call_twice(config["AMQP_URI"], "register_patient", [patient()])

    assert first["error"] is None and second["error"] is None
    assert first["result"] == second["result"]
    assert db.execute(select(func.count()).select_from(Patient)).scalar_one() == 1
    assert db.execute(select(func.count()).select_from(AuditEvent)).scalar_one() == 1


def test_a_redelivered_update_applies_once(config, service, patients, db):
    stored = patients.register_patient(patient())
    changed = {**stored, "gender": "other"}

    first, second = call_twice(
        config["AMQP_URI"], "update_patient", [stored["id"], changed, "1"]
    )

    assert second["error"] is None, second["error"]
    assert first["result"] == second["result"]
    assert patients.get_patient(stored["id"])["meta"]["versionId"] == "2"


@pytest.mark.parametrize("method", ["register_patients"])
def test_a_redelivered_batch_creates_each_patient_once(config, service, db, method):
    entries = [{"resource": patient()} for _ in range(3)]

    answers = call_twice(config["AMQP_URI"], method, [entries])

    # The delivery that waited may answer first: either order is right.
    statuses = sorted(tuple(r["status"] for r in a["result"]) for a in answers)
    assert statuses == [("created",) * 3, ("replayed",) * 3]
    assert db.execute(select(func.count()).select_from(Patient)).scalar_one() == 3


def test_separate_calls_without_a_key_are_separate_patients(patients, db):
    resource = patient()
    del resource["identifier"]
    patients.register_patient(resource)
    patients.register_patient(resource)

    assert db.execute(select(func.count()).select_from(Patient)).scalar_one() == 2


def test_old_delivery_records_are_purged_and_callers_keys_kept(patients, db):
    patients.register_patient(patient())
    patients.register_patient(patient(), idempotency_key="kept")

    later = datetime.now(UTC) + timedelta(hours=1)
    assert purge_delivery_records(db, later) == 1

    db.rollback()
    left = db.execute(select(IdempotencyRecord.scope)).scalars().all()
    assert left == ["register"]


def publish_raw(amqp_uri, body, method="register_patient", **properties):
    exchange = Exchange("nameko-rpc", type="topic", durable=True)
    with Connection(amqp_uri) as conn:
        conn.Producer(exchange=exchange).publish(
            body, routing_key=f"patient_service.{method}", **properties
        )


def test_a_request_without_reply_to_is_dropped_and_the_service_goes_on(
    config, patients, db
):
    body = json.dumps({"args": [patient()], "kwargs": {}})
    publish_raw(config["AMQP_URI"], body, content_type="application/json")
    publish_raw(
        config["AMQP_URI"],
        body,
        method="no_such_method",
        content_type="application/json",
    )

    assert patients.ping() == "pong"
    assert patients.ping() == "pong"


def test_a_malformed_call_stack_in_the_context_is_ignored(config, service):
    for stack in ([1], "x", [None], ["a"] * 1000, {"a": 1}):
        with ClusterRpcProxy(
            config, timeout=10, context_data={"call_id_stack": stack}
        ) as proxy:
            assert proxy.patient_service.ping() == "pong"


def test_an_undecodable_body_is_dropped_without_logging_it(config, patients, caplog):
    body = json.dumps(
        {"args": [patient(name=[{"family": "Undecodable"}])], "kwargs": {}}
    )
    publish_raw(
        config["AMQP_URI"],
        body + "}}garbage",
        content_type="application/json",
        reply_to="nobody",
        correlation_id="c-1",
    )

    assert patients.ping() == "pong"
    assert "Undecodable" not in caplog.text


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        ('{"args": [{"resourceType": "Pat', {}),
        (b"\xff\xfe not text", {}),
        (bz2.compress(b'{"args": [], "kwargs": {}}'), {"compression": "bzip2"}),
    ],
    ids=["truncated JSON", "not UTF-8", "compressed"],
)
def test_an_unreadable_request_is_answered_with_invalid_request(
    config, patients, body, headers
):
    [reply] = call_raw(config["AMQP_URI"], "ping", body, headers=headers)

    assert reply["result"] is None
    assert reply["error"]["exc_type"] == "InvalidRequest"
    [errors] = reply["error"]["exc_args"]
    assert list(errors) == ["request"]
    assert patients.ping() == "pong"


def test_a_single_resource_far_over_its_limit_is_refused_before_decoding(
    config, patients
):
    huge = patient(text={"status": "generated", "div": "x" * 2_000_000})
    body = json.dumps({"args": [huge], "kwargs": {}})

    [reply] = call_raw(config["AMQP_URI"], "register_patient", body)

    assert reply["error"]["exc_type"] == "InvalidRequest"
    assert reply["error"]["exc_args"] == [
        {"request": ["must be uncompressed, 1 MiB at most"]}
    ]
    # A batch may be larger; the entry alone is refused.
    [entry] = patients.register_patients([{"resource": huge}])
    assert entry["status"] == "invalid"


def test_more_poison_is_dropped_and_the_service_goes_on(config, patients):
    body = json.dumps({"args": [], "kwargs": {}})
    uri = config["AMQP_URI"]
    publish_raw(uri, body, method="ping", reply_to="nobody", correlation_id="c-2")
    publish_raw(
        uri,
        body,
        method="ping",
        content_type="application/json",
        reply_to="nobody",
        correlation_id="c-3",
        headers={"nameko.call_id_stack": None},
    )
    publish_raw(
        uri,
        bz2.compress(b"[" * 1000 + b"]" * 1000),
        method="ping",
        content_type="application/json",
        reply_to="nobody",
        correlation_id="c-4",
        headers={"compression": "application/x-bz2"},
    )

    assert patients.ping() == "pong"
    assert patients.ping() == "pong"


@pytest.mark.parametrize(
    "context",
    [
        {"user_id": "dr\x00who"},
        {"user_id": "x" * 100_000},
        {"call_id_stack": ["caller.method.1\n2026 CRITICAL forged"]},
        {"call_id_stack": ["x" * 100_000]},
    ],
)
def test_odd_context_data_neither_fails_calls_nor_reaches_the_audit(
    config, service, db, context
):
    with ClusterRpcProxy(config, timeout=10, context_data=context) as proxy:
        proxy.patient_service.register_patient(patient())

    db.rollback()
    event = db.execute(select(AuditEvent)).scalar_one()
    assert len(event.actor) <= 200 and "\n" not in event.actor
    assert event.service is None or len(event.service) <= 200


def test_a_reply_that_cannot_be_sent_leaves_the_service_running(config, patients):
    with (
        mock.patch.object(Replier, "send_response", side_effect=ConnectionRefusedError),
        ClusterRpcProxy(config, timeout=2) as proxy,
        pytest.raises(RpcTimeout),
    ):
        proxy.patient_service.ping()

    assert patients.ping() == "pong"


def reply_through(config, result, **settings):
    """Send ``result`` as the service answers a call; return the message the
    caller's queue receives."""
    exchange = Exchange("nameko-rpc", type="topic", durable=True)
    name = f"test-replies-{uuid.uuid4()}"
    reply_queue = Queue(name, exchange, routing_key=name, auto_delete=True)
    request = mock.Mock(
        properties={
            "content_type": "application/json",
            "reply_to": name,
            "correlation_id": "c-1",
        }
    )
    with Connection(config["AMQP_URI"]) as conn:
        reply_queue(conn.default_channel).declare()
        Replier({**config, **settings}, request).send_response(result, None)
        for _ in range(50):
            if message := reply_queue(conn.default_channel).get(no_ack=True):
                return message
            eventlet.sleep(0.1)
    raise AssertionError("no reply arrived")


def test_replies_are_transient_unless_persistence_is_asked_for(config, service):
    transient = reply_through(config, "pong")
    persistent = reply_through(
        config, "pong", RPC_REPLY_PERSISTENT="true", RPC_REPLY_CONFIRMS=True
    )

    assert transient.properties.get("delivery_mode") != 2
    assert persistent.properties.get("delivery_mode") == 2
    assert [json.loads(m.body) for m in (transient, persistent)] == [
        {"result": "pong", "error": None}
    ] * 2
    assert persistent.properties["correlation_id"] == "c-1"


def test_a_reply_that_cannot_be_encoded_reaches_the_caller_as_an_error(config, service):
    message = reply_through(config, {"thing": object()})

    reply = json.loads(message.body)
    assert reply["result"] is None
    assert reply["error"]["exc_type"] == "UnserializableValueError"
