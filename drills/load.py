"""A steady load of registrations, reads and searches: each caller a green
thread with its own proxy and a deadline, every call recorded."""

import contextlib
import itertools
import random
import time
import uuid
from dataclasses import dataclass

import eventlet
from amqp.exceptions import AMQPError
from kombu.exceptions import OperationalError as KombuOperationalError
from nameko.exceptions import RpcTimeout
from nameko.standalone.rpc import ClusterRpcProxy

# Importing the errors registers them: callers get the service's types.
from patient.errors import PatientServiceError

# Answers a retry may change: the call did not (or may not) reach the
# database. Anything else is the answer.
RETRYABLE = {"ServiceUnavailable", "RpcTimeout", "Hang", "Disconnected"}
HANG_MARGIN_S = 5.0


@dataclass
class Call:
    kind: str
    started: float
    ended: float
    outcome: str  # "ok", or the error's type name

    @property
    def took(self):
        return self.ended - self.started


@dataclass
class Registration:
    keyed: bool
    patient_id: str | None = None
    attempts: int = 0
    answered: Call | None = None


class Caller:
    """One proxy, rebuilt after the broker connection breaks; every call ends
    within the proxy's timeout plus a margin, or is recorded as a hang."""

    def __init__(self, config, timeout, calls):
        self.config = config
        self.timeout = timeout
        self.calls = calls
        self.proxy = None
        self.rpc = None

    def call(self, kind, method, *args, **kwargs):
        started = time.monotonic()
        result = None
        try:
            with eventlet.Timeout(self.timeout + HANG_MARGIN_S, Hang()):
                if self.rpc is None:
                    self.proxy = ClusterRpcProxy(self.config, timeout=self.timeout)
                    self.rpc = self.proxy.start()
                result = getattr(self.rpc.patient_service, method)(*args, **kwargs)
            outcome = "ok"
        except PatientServiceError as exc:
            outcome = type(exc).__name__
        except RpcTimeout:
            outcome = "RpcTimeout"
        except Hang:
            outcome = "Hang"
            self.close()
        except Exception as exc:
            # The broker went away, or the reply never could come: a new
            # proxy for the next call.
            outcome = _connection_outcome(exc)
            self.close()
        record = Call(kind, started, time.monotonic(), outcome)
        self.calls.append(record)
        return record, result

    def close(self):
        proxy, self.proxy, self.rpc = self.proxy, None, None
        if proxy is not None:
            with contextlib.suppress(Exception), eventlet.Timeout(2):
                proxy.stop()


class Hang(Exception):
    pass


def _connection_outcome(exc):
    if isinstance(exc, OSError | AMQPError | KombuOperationalError):
        return "Disconnected"
    return type(exc).__name__


def resource(value, serial):
    return {
        "resourceType": "Patient",
        # No system: the database does not enforce such an identifier's
        # uniqueness, so only idempotency stands between a retry and a twin.
        "identifier": [{"value": value}],
        "name": [{"family": "Drillperson", "given": [f"Case{serial}"]}],
        "gender": "female",
        "birthDate": "1980-05-17",
    }


class Load:
    """``registrars`` callers registering (two in three with an idempotency
    key, retried until acknowledged; the rest once, without a key),
    ``readers`` reading acknowledged patients, ``searchers`` searching."""

    def __init__(
        self,
        amqp_uri,
        *,
        registrars=3,
        readers=2,
        searchers=2,
        timeout=10.0,
        pause=0.05,
        retry_for=60.0,
    ):
        self.config = {"AMQP_URI": amqp_uri}
        self.run = uuid.uuid4().hex[:8]
        self.prefix = f"drill-{self.run}-"
        self.timeout = timeout
        self.pause = pause
        self.retry_for = retry_for
        self.calls = []
        self.registrations = {}
        self.acknowledged = []
        self._serial = itertools.count(1)
        self._stopping = False
        self._workers = (
            [self._registering] * registrars
            + [self._reading] * readers
            + [self._searching] * searchers
        )
        self._threads = []

    def __enter__(self):
        self._threads = [eventlet.spawn(self._loop, work) for work in self._workers]
        return self

    def __exit__(self, *exc_info):
        self.stop()

    def stop(self):
        self._stopping = True
        for thread in self._threads:
            thread.wait()
        self._threads = []

    def _loop(self, work):
        caller = Caller(self.config, self.timeout, self.calls)
        try:
            while not self._stopping:
                outcome = work(caller)
                # A caller that cannot get through backs off a little.
                eventlet.sleep(self.pause if outcome == "ok" else 0.2)
        finally:
            caller.close()

    def _registering(self, caller):
        serial = next(self._serial)
        value = f"{self.prefix}{serial}"
        keyed = serial % 3 != 0
        registration = self.registrations[value] = Registration(keyed)
        kwargs = {"idempotency_key": value} if keyed else {}
        give_up = time.monotonic() + self.retry_for
        while True:
            registration.attempts += 1
            call, stored = caller.call(
                "register", "register_patient", resource(value, serial), **kwargs
            )
            if call.outcome == "ok":
                registration.patient_id = stored["id"]
                registration.answered = call
                self.acknowledged.append(stored["id"])
                return call.outcome
            retryable = call.outcome in RETRYABLE
            if not keyed or not retryable or time.monotonic() > give_up:
                return call.outcome
            eventlet.sleep(0.2)

    def _reading(self, caller):
        if not self.acknowledged:
            eventlet.sleep(0.1)
            return "ok"
        call, _ = caller.call("read", "get_patient", random.choice(self.acknowledged))
        return call.outcome

    def _searching(self, caller):
        acknowledged = [
            value for value, r in self.registrations.items() if r.patient_id
        ]
        if not acknowledged:
            eventlet.sleep(0.1)
            return "ok"
        value = random.choice(acknowledged)
        call, page = caller.call(
            "search", "search_patients", {"identifier": f"|{value}"}, 5
        )
        if call.outcome == "ok" and len(page["patients"]) != 1:
            # Recorded as its own outcome: an acknowledged patient missing.
            call.outcome = "SearchMissed"
        return call.outcome

    # What the calls add up to.

    def outcomes(self, kind=None, since=None, until=None):
        return [
            call
            for call in self.calls
            if (kind is None or call.kind == kind)
            and (since is None or call.started >= since)
            and (until is None or call.started < until)
        ]

    def longest_stall(self):
        return max((call.took for call in self.calls), default=0.0)

    def recovery(self, since):
        """Seconds from ``since`` until every kind of call succeeded again."""
        firsts = []
        for kind in ("register", "read", "search"):
            ok = [
                c.ended
                for c in self.calls
                if c.kind == kind and c.outcome == "ok" and c.ended >= since
            ]
            if not ok:
                return None
            firsts.append(min(ok) - since)
        return max(firsts)

    def acknowledged_registrations(self):
        return {
            value: r.patient_id
            for value, r in self.registrations.items()
            if r.patient_id is not None
        }
