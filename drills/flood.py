"""Malformed requests published straight onto the service's RPC queue, as
a broken or hostile client would, with a reply queue to hear the answers."""

import contextlib
import json
import socket
import uuid

import eventlet
from kombu import Connection, Exchange, Producer, Queue

RPC_EXCHANGE = Exchange("nameko-rpc", type="topic", durable=True)
ROUTING_KEY = "patient_service.register_patient"
BIG_BYTES = 20 * 1024 * 1024


def malformed_requests(bad_json=300, wrong_arguments=300, big=5):
    """(kind, body) pairs: JSON that does not parse, arguments the method
    does not have, and 20 MB requests."""
    big_body = json.dumps(
        {
            "args": [
                {
                    "resourceType": "Patient",
                    "text": {"status": "generated", "div": "x" * BIG_BYTES},
                }
            ],
            "kwargs": {},
        }
    ).encode()
    for n in range(max(bad_json, wrong_arguments, big)):
        if n < bad_json:
            yield "bad JSON", b'{"args": [{"resourceType": "Pat'
        if n < wrong_arguments:
            body = {"args": [], "kwargs": {"patinet": {}, "key": n}}
            yield "wrong argument names", json.dumps(body).encode()
        if n < big:
            yield "20 MB payload", big_body


class Flood:
    """Publishes requests and collects the replies by correlation id."""

    def __init__(self, amqp_uri):
        self.connection = Connection(amqp_uri)
        self.reply_queue = Queue(
            f"rpc.reply-drill-flood-{uuid.uuid4().hex}",
            exchange=RPC_EXCHANGE,
            auto_delete=True,
            exclusive=True,
        )
        self.reply_queue.routing_key = self.reply_queue.name
        self.sent = {}
        self.replies = {}

    def __enter__(self):
        self.channel = self.connection.channel()
        self.reply_queue(self.channel).declare()
        self.consumer = self.connection.Consumer(
            self.reply_queue, callbacks=[self._on_reply], accept=["json"]
        )
        self.consumer.consume()
        self.producer = Producer(self.connection.channel())
        return self

    def __exit__(self, *exc_info):
        with contextlib.suppress(Exception):
            self.connection.close()

    def _on_reply(self, body, message):
        self.replies[message.properties.get("correlation_id")] = body
        message.ack()

    def send(self, kind, body):
        correlation_id = uuid.uuid4().hex
        self.sent[correlation_id] = kind
        self.producer.publish(
            body,
            exchange=RPC_EXCHANGE,
            routing_key=ROUTING_KEY,
            reply_to=self.reply_queue.name,
            correlation_id=correlation_id,
            content_type="application/json",
            content_encoding="utf-8",
            delivery_mode=2,
        )
        eventlet.sleep(0)

    def collect(self, timeout):
        """Wait up to ``timeout`` seconds for every reply."""
        with eventlet.Timeout(timeout, False):
            while len(self.replies) < len(self.sent):
                with contextlib.suppress(socket.timeout):
                    self.connection.drain_events(timeout=1)

    def answers(self):
        """Per kind of request: how many were sent, and the errors they got."""
        summary = {}
        for correlation_id, kind in self.sent.items():
            entry = summary.setdefault(kind, {"sent": 0, "answers": {}})
            entry["sent"] += 1
            reply = self.replies.get(correlation_id)
            if reply is None:
                answer = "no answer"
            elif reply.get("error"):
                answer = reply["error"].get("exc_type", "error")
            else:
                answer = "accepted"
            entry["answers"][answer] = entry["answers"].get(answer, 0) + 1
        return summary
