"""The ``queue_service`` dependency: Nameko's RPC proxy to the Queue
Service, with a deadline on every call, an AMQP expiration so that a request
nobody took in time is never run late, and a circuit breaker.

The contract (README, "The Queue Service contract"): ``enqueue_appointment``
and ``cancel_appointment``, both de-duplicated by ``request_id``.
"""

import logging

import eventlet
from circuitbreaker import CircuitBreaker
from eventlet.semaphore import Semaphore
from nameko.exceptions import RemoteError, UnknownService
from nameko.rpc import RpcProxy

log = logging.getLogger(__name__)

TARGET = "queue_service"
# The Queue Service's own word that the request is bad: retrying is useless.
REFUSALS = frozenset({"InvalidAppointmentRequest"})
QUEUED, CANCELLED = "queued", "cancelled"


class QueueCallFailed(Exception):
    """A call to the Queue Service failed.

    ``undelivered``: it certainly never ran (no such queue, or the circuit
    is open). ``refused``: the Queue Service answered that the request is
    bad. ``error`` names what happened, for the outbox and the log.
    """

    def __init__(self, error, undelivered=False, refused=False):
        super().__init__(error)
        self.error = error
        self.undelivered = undelivered
        self.refused = refused


class CircuitOpen(QueueCallFailed):
    def __init__(self):
        super().__init__("CircuitOpen", undelivered=True)


class _Deadline(Exception):
    pass


class QueueServiceRpc(RpcProxy):
    def __init__(self, **options):
        super().__init__(TARGET, **options)

    def setup(self):
        config = self.container.config
        self.deadline = float(config.get("QUEUE_CALL_DEADLINE_S", 2))
        # RabbitMQ drops the request if no Queue Service took it by then.
        self.options = {**self.options, "expiration": self.deadline}
        # An answer, even an error, means the Queue Service is there.
        self.breaker = CircuitBreaker(
            failure_threshold=int(config.get("QUEUE_BREAKER_FAILURES", 5)),
            recovery_timeout=float(config.get("QUEUE_BREAKER_RESET_S", 30)),
            expected_exception=_is_outage,
            name=TARGET,
        )
        # Calls made while a request waits for its reply; the rest of the
        # workers never wait for the Queue Service.
        workers = int(config.get("max_workers", 10))
        self.inline = Semaphore(
            int(config.get("QUEUE_INLINE_CALLS", workers // 4 or 1))
        )
        super().setup()

    def get_dependency(self, worker_ctx):
        proxy = super().get_dependency(worker_ctx)
        return QueueClient(proxy, self.deadline, self.breaker, self.inline)


class QueueClient:
    """What a worker gets as ``self.queue_service``."""

    def __init__(self, proxy, deadline, breaker, inline):
        self._proxy = proxy
        self.deadline = deadline
        self._breaker = breaker
        self.inline = inline

    @property
    def circuit(self):
        """``closed``, ``open`` or ``half_open`` (a trial call may go)."""
        return self._breaker.state

    @property
    def open_remaining(self):
        """Seconds until the open circuit lets a trial call through."""
        return max(0, self._breaker.open_remaining)

    def enqueue_appointment(self, request):
        reply = self._call("enqueue_appointment", request)
        return _ticket(reply)

    def cancel_appointment(self, request_id):
        self._call("cancel_appointment", request_id)

    def _call(self, method, *args):
        # An open circuit refuses at once. The breaker takes no lock while
        # a call runs, so calls run side by side.
        if self._breaker.opened:
            raise CircuitOpen()
        try:
            return self._breaker.call(self._call_in_time, method, *args)
        except _Deadline:
            raise QueueCallFailed("Timeout") from None
        except UnknownService:
            raise QueueCallFailed("UnknownService", undelivered=True) from None
        except RemoteError as exc:
            refused = exc.exc_type in REFUSALS
            raise QueueCallFailed(f"Remote{exc.exc_type}", refused=refused) from None
        except Exception as exc:  # the broker, most likely
            raise QueueCallFailed(type(exc).__name__) from None

    def _call_in_time(self, method, *args):
        reply = None
        try:
            with eventlet.Timeout(self.deadline, _Deadline()):
                reply = getattr(self._proxy, method).call_async(*args)
                return reply.result()
        except _Deadline:
            if reply is not None:
                _forget(self._proxy.reply_listener, reply)
            raise


def _is_outage(exc_type, exc):
    # Any answer, an error included, shows the Queue Service is there.
    return not issubclass(exc_type, RemoteError)


def _forget(listener, reply):
    # Known shortcoming: Nameko 2.14 keeps a reply it waits for until it
    # comes, so a call that timed out leaves an entry behind; this reaches
    # into the listener's private map. A reply listener with expiring
    # entries would fix it.
    events = listener._reply_events
    for correlation_id, event in list(events.items()):
        if event is reply.reply_event:
            del events[correlation_id]


def _ticket(reply):
    """The enqueue reply, checked: the contract's fields or a failure."""
    if not isinstance(reply, dict) or reply.get("status") not in (QUEUED, CANCELLED):
        raise QueueCallFailed("BadReply")
    ticket_id, position = reply.get("ticket_id"), reply.get("position")
    if reply["status"] == QUEUED and not (
        isinstance(ticket_id, str) and 0 < len(ticket_id) <= 200
    ):
        raise QueueCallFailed("BadReply")
    if position is not None and (
        not isinstance(position, int) or isinstance(position, bool) or position < 0
    ):
        position = None
    return {"status": reply["status"], "ticket_id": ticket_id, "position": position}
