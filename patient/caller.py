"""Who is asking: taken from the call, written to the audit trail."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Caller:
    actor: str
    service: str | None = None
    call_id: str | None = None
    # The AMQP correlation id of the message being handled: a redelivered
    # message carries the same one, so it keys writes made without an
    # idempotency key.
    delivery_id: str | None = None


SYSTEM = Caller(actor="system")
