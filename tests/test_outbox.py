"""The outbox on the real database: schedules, leases and claims."""

import uuid
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace

import eventlet
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from patient import health, outbox, records, relay
from patient.caller import SYSTEM
from patient.models import AppointmentRequest, OutboxMessage
from patient.queue import QueueCallFailed
from tests.factories import patient

# Far enough ahead that the running service's relay never finds these due.
LATER = datetime.now(UTC) + timedelta(days=30)
POLICY = outbox.Policy(max_attempts=3, backoff_base_s=1, backoff_max_s=8, lease_s=10)


@pytest.fixture
def owed(db):
    """Five enqueue messages, due at LATER."""
    someone = records.register_patient(db, patient(), SYSTEM)
    ids = []
    for _ in range(5):
        request = AppointmentRequest(
            id=uuid.uuid4(),
            patient_id=someone["id"],
            version=1,
            status="pending",
            reason="check-up",
            priority="routine",
            modality="video",
            created_at=LATER,
            updated_at=LATER,
        )
        db.add(request)
        db.flush()
        db.add(
            OutboxMessage(
                request_id=request.id,
                action="enqueue",
                attempts=0,
                next_attempt_at=LATER,
                maybe_delivered=False,
                created_at=LATER,
            )
        )
        ids.append(str(request.id))
    db.commit()
    return ids


def test_backoff_doubles_up_to_its_maximum_jittered_in_the_upper_half():
    for attempts, ceiling in [(1, 1), (2, 2), (3, 4), (4, 8), (9, 8)]:
        delays = [POLICY.backoff(attempts) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert max(delays) - min(delays) > ceiling / 4  # jittered


def test_instances_claiming_together_never_take_the_same_message(engine, owed):
    with Session(engine) as holder, Session(engine) as other:
        held = holder.scalars(
            select(OutboxMessage)
            .order_by(OutboxMessage.id)
            .limit(2)
            .with_for_update(skip_locked=True)
        ).all()

        claimed = outbox.claim_due(other, POLICY, 10, now=LATER)

        held_ids = {str(m.request_id) for m in held}
        assert {d.request_id for d in claimed} == set(owed) - held_ids
        holder.rollback()


def test_a_claimed_message_is_leased_until_past_its_call(engine, owed):
    with Session(engine) as session:
        first = outbox.claim_due(session, POLICY, 10, now=LATER)
        during = outbox.claim_due(
            session, POLICY, 10, now=LATER + timedelta(seconds=POLICY.lease_s - 1)
        )
        after = outbox.claim_due(
            session, POLICY, 10, now=LATER + timedelta(seconds=POLICY.lease_s + 1)
        )

    assert len(first) == 5 and during == []
    assert [d.attempts for d in after] == [2] * 5
    assert all(d.was_maybe_delivered for d in after)
    assert {d.payload["reason"] for d in after} == {"check-up"}


class DownQueue:
    """The queue_service dependency of a Queue Service that never answers."""

    def __init__(self, circuit):
        self.circuit = circuit
        self.open_remaining = 30
        self.calls = 0

    def enqueue_appointment(self, request):
        self.calls += 1
        raise QueueCallFailed("Timeout")


def attempts(engine):
    with Session(engine) as session:
        return sorted(session.scalars(select(OutboxMessage.attempts)).all())


@pytest.mark.parametrize(
    ("circuit", "calls", "spent"),
    [
        ("closed", 5, [1, 1, 1, 1, 1]),
        ("half_open", 1, [0, 0, 0, 0, 1]),
        ("open", 0, [0, 0, 0, 0, 0]),
    ],
)
def test_an_outage_spends_one_attempt_a_trial_not_one_of_each_request(
    engine, owed, circuit, calls, spent
):
    queue = DownQueue(circuit)
    with Session(engine) as session:
        relay.relay_due(session, queue, POLICY, now=LATER)

    assert queue.calls == calls
    assert attempts(engine) == spent


class SlowQueue:
    """Answers every call after a pause, counting the calls under way."""

    circuit = "closed"

    def __init__(self):
        self.running = self.most = 0

    def enqueue_appointment(self, request):
        self.running += 1
        self.most = max(self.most, self.running)
        eventlet.sleep(0.05)
        self.running -= 1
        return {"status": "queued", "ticket_id": "T-1", "position": 1}


def test_the_calls_of_a_batch_go_side_by_side(engine, owed):
    queue = SlowQueue()
    with Session(engine) as session:
        relay.relay_due(session, queue, POLICY, now=LATER)

    assert queue.most == len(owed)
    assert attempts(engine) == []  # all answered


def test_a_half_open_circuit_with_nothing_failing_is_not_degraded(engine, owed):
    with Session(engine) as session:
        status = health.queue_status(session, SimpleNamespace(circuit="half_open"))
    assert status["status"] == "up"
    assert status["owed"] == len(owed)
