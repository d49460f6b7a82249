"""Nameko extensions of the service: the RPC entrypoint and the caller."""

import functools
import inspect
import logging
import re
import sys
import traceback
import uuid

import eventlet
import kombu.serialization
import kombu.utils.json
from amqp.exceptions import AMQPError
from kombu.exceptions import OperationalError as KombuOperationalError
from kombu.serialization import registry
from nameko.amqp.publish import Publisher
from nameko.constants import (
    AMQP_SSL_CONFIG_KEY,
    AMQP_URI_CONFIG_KEY,
    CALL_ID_STACK_CONTEXT_KEY,
    LOGIN_METHOD_CONFIG_KEY,
    NON_PERSISTENT,
    PERSISTENT,
)
from nameko.exceptions import (
    IncorrectSignature,
    MethodNotFound,
    UnserializableValueError,
    serialize,
)
from nameko.extensions import DependencyProvider
from nameko.messaging import QueueConsumer
from nameko.rpc import Rpc, RpcConsumer, get_rpc_exchange
from nameko.timer import Timer
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from patient.auth import Principal
from patient.auth import caller as http_caller
from patient.caller import Caller
from patient.encoded import decode_all, embed
from patient.errors import (
    EXPECTED_ERRORS,
    InternalError,
    InvalidRequest,
    PatientServiceError,
    ServiceUnavailable,
)
from patient.settings import flag

log = logging.getLogger(__name__)

DELIVERY_KEY = "patient_service.delivery_id"


MAX_CALL_STACK = 20
# Nameko's call ids are "service.method.uuid"; nothing else gets into logs
# and the audit trail.
_CALL_ID = re.compile(r"[A-Za-z0-9_.:\-]{1,200}")
_USER_ID = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,200}")
# A batch of 100 resources at the 256 KiB limit, as JSON with \uXXXX
# escapes (up to three times the UTF-8 size), with room for the envelope.
MAX_MESSAGE_BYTES = 80 * 1024 * 1024
# One resource at that limit, escaped, and the other arguments.
ONE_RESOURCE_BYTES = 1024 * 1024
UNREADABLE = "must be a JSON object with args and kwargs"
DEFAULT_CALL_DEADLINE_S = 8.0
SLOW = "the patient database did not answer in time; retry later"
# Statement or lock timeouts, deadlocks, serialisation failures: the next
# try may well succeed.
TRANSIENT_SQLSTATES = frozenset({"57014", "55P03", "40P01", "40001"})


class GuardedQueueConsumer(QueueConsumer):
    """Nameko's queue consumer, screening messages before they are decoded.

    kombu would inflate a compressed body of any size (a few kilobytes of
    bz2 become gigabytes) and log an undecodable body whole, patient data and
    all. Compressed, oversized and undecodable messages are refused unread:
    answered with ``InvalidRequest`` where the provider can answer them.
    """

    def get_consumers(self, consumer_cls, channel):
        consumers = super().get_consumers(consumer_cls, channel)
        for provider, consumer in self._consumers.items():
            # With on_message set, kombu hands over the message undecoded.
            consumer.on_message = functools.partial(self._screen, provider, consumer)
        return consumers

    def _screen(self, provider, consumer, message):
        size = len(message.body or b"")
        limit = _request_limit(provider, message)
        if message.headers.get("compression") or size > limit:
            log.warning("refused a compressed or oversized message (%s bytes)", size)
            mib = limit // (1024 * 1024)
            self._refuse(provider, message, f"must be uncompressed, {mib} MiB at most")
            return
        try:
            body = message.decode()
        except Exception as exc:
            log.warning(
                "refused a message that could not be decoded (%s, %s bytes)",
                type(exc).__name__,
                size,
            )
            self._refuse(provider, message, UNREADABLE)
            return
        consumer.receive(body, message)

    def _refuse(self, provider, message, reason):
        refuse = getattr(provider, "refuse", None)
        if refuse is None:
            self.ack_message(message)
            return
        # Answering publishes: not on the thread that reads the queue.
        self.container.spawn_managed_thread(functools.partial(refuse, message, reason))


def _request_limit(provider, message):
    limit = getattr(provider, "request_limit", None)
    if limit is None:
        return MAX_MESSAGE_BYTES
    return limit(message.delivery_info.get("routing_key"))


class GuardedRpcConsumer(RpcConsumer):
    """Drops requests that no one could be answered for, and survives a
    reply that cannot be sent.

    Nameko answers to ``reply_to``, encoded as ``content_type``; a request
    without either made the answer fail with a KeyError that killed the
    service, and the unacknowledged request killed it again on every
    restart. A broker gone while a call ran killed it too.

    Known shortcoming: one queue serves every caller in order, so a flood
    of requests, malformed or not, delays the calls behind it by its length
    over the service's rate (a few hundred malformed requests a second on a
    2-core machine). Fairness between callers needs a queue per caller or a
    rate limit in front of the service.
    """

    queue_consumer = GuardedQueueConsumer()

    def handle_message(self, body, message):
        properties = message.properties
        if not properties.get("reply_to") or not properties.get("content_type"):
            log.warning("dropped an RPC request without reply_to or content_type")
            self.queue_consumer.ack_message(message)
            return
        super().handle_message(body, message)

    def request_limit(self, routing_key):
        """The largest request the method takes, decoded or not."""
        try:
            return self.get_provider_for_method(routing_key).max_request_bytes
        except (MethodNotFound, AttributeError):
            return MAX_MESSAGE_BYTES

    def refuse(self, message, reason):
        """Answer a request refused unread, if it says where and in an
        encoding this service speaks; else drop it."""
        serializer = registry.type_to_name.get(message.properties.get("content_type"))
        if not message.properties.get("reply_to") or (
            serializer not in self.container.accept
        ):
            log.warning("dropped an unreadable request that cannot be answered")
            self.queue_consumer.ack_message(message)
            return
        error = InvalidRequest({"request": [reason]})
        self.handle_result(message, None, (InvalidRequest, error, None))

    def handle_result(self, message, result, exc_info):
        try:
            replier = Replier(self.container.config, message)
            result, exc_info = replier.send_response(result, exc_info)
            self.queue_consumer.ack_message(message)
            return result, exc_info
        except (OSError, AMQPError, KombuOperationalError) as exc:
            # Unacknowledged, the request comes back once the broker does,
            # and is answered from its first delivery.
            log.warning("could not answer a call: %s", type(exc).__name__)
            return result, exc_info


class Replier:
    """Publishes the answer to a call, as Nameko's ``Responder`` does, with
    the service's reply options and the answer serialised once (Nameko
    serialises it a second time to check that it can).

    ``RPC_REPLY_CONFIRMS`` and ``RPC_REPLY_PERSISTENT`` (both off by default)
    choose publisher confirms and persistent delivery for replies; the
    reasons are in docs/benchmarks.md.
    """

    def __init__(self, config, message):
        self.config = config
        self.message = message

    def send_response(self, result, exc_info):
        error = serialize(exc_info[1]) if exc_info is not None else None
        # The answer is encoded the way the request was.
        content_type = self.message.properties["content_type"]
        serializer = kombu.serialization.registry.type_to_name[content_type]
        try:
            encoded = _encode({"result": result, "error": error}, serializer)
        except Exception:
            exc_info = sys.exc_info()
            result, error = None, serialize(UnserializableValueError(result))
            encoded = _encode({"result": None, "error": error}, serializer)
        content_type, content_encoding, body = encoded

        config = self.config
        publisher = Publisher(
            config[AMQP_URI_CONFIG_KEY],
            use_confirms=flag(config.get("RPC_REPLY_CONFIRMS", False)),
            delivery_mode=PERSISTENT
            if flag(config.get("RPC_REPLY_PERSISTENT", False))
            else NON_PERSISTENT,
            ssl=config.get(AMQP_SSL_CONFIG_KEY),
            login_method=config.get(LOGIN_METHOD_CONFIG_KEY),
        )
        publisher.publish(
            body,
            content_type=content_type,
            content_encoding=content_encoding,
            exchange=get_rpc_exchange(config),
            routing_key=self.message.properties["reply_to"],
            correlation_id=self.message.properties.get("correlation_id"),
        )
        return result, exc_info


def _encode(answer, serializer):
    """kombu's encoding of ``answer``; in JSON, resources read as text are
    embedded as they are (``patient.encoded``)."""
    if serializer == "json":
        body = embed(answer, kombu.utils.json.dumps)
        return "application/json", "utf-8", body
    return kombu.serialization.dumps(decode_all(answer), serializer)


class PatientRpc(Rpc):
    """Nameko's RPC entrypoint, keeping the message's correlation id.

    A message redelivered after a crash has the same correlation id; writes
    made without an idempotency key use it to answer the redelivery from the
    first delivery instead of writing twice.
    """

    rpc_consumer = GuardedRpcConsumer()

    def __init__(self, *, max_request_bytes=MAX_MESSAGE_BYTES, **kwargs):
        # A request over it is refused before it is decoded: decoding and
        # checking 20 MB holds up every other worker for a while.
        self.max_request_bytes = max_request_bytes
        super().__init__(**kwargs)

    def check_signature(self, args, kwargs):
        # The method is wrapped by ``rpc`` below; check the arguments against
        # the signature it was written with.
        method = inspect.unwrap(getattr(self.container.service_cls, self.method_name))
        try:
            inspect.signature(method).bind(None, *args, **kwargs)
        except TypeError as exc:
            raise IncorrectSignature(str(exc)) from None

    def unpack_message_headers(self, message):
        data = super().unpack_message_headers(message)
        # Nameko joins the call stack into a log line outside any error
        # handling: a stack that is not a list of strings killed the service.
        if CALL_ID_STACK_CONTEXT_KEY in data and not _is_call_stack(
            data[CALL_ID_STACK_CONTEXT_KEY]
        ):
            del data[CALL_ID_STACK_CONTEXT_KEY]
        # Nameko copies every context key into the headers of onward calls;
        # CallerProvider takes this one out before the worker runs.
        data[DELIVERY_KEY] = _delivery_id(message.properties)
        return data


def _delivery_id(properties):
    """The same for a redelivered message, and tied to the caller's own reply
    queue: another client reusing a correlation id gets no one else's answer."""
    correlation_id, reply_to = (
        properties.get("correlation_id"),
        properties.get("reply_to"),
    )
    if not isinstance(correlation_id, str) or not correlation_id:
        return None
    return f"{reply_to}/{correlation_id}"[:500]


def _is_call_stack(stack):
    return (
        isinstance(stack, list)
        and len(stack) <= MAX_CALL_STACK
        and all(isinstance(c, str) and _CALL_ID.fullmatch(c) for c in stack)
    )


def rpc(method=None, *, sensitive_arguments=(), max_request_bytes=MAX_MESSAGE_BYTES):
    """A PatientRpc entrypoint around ``guarded(method)``, refusing unread a
    request over ``max_request_bytes``."""

    if method is None:
        return functools.partial(
            rpc,
            sensitive_arguments=sensitive_arguments,
            max_request_bytes=max_request_bytes,
        )

    return PatientRpc.decorator(
        expected_exceptions=EXPECTED_ERRORS,
        sensitive_arguments=sensitive_arguments,
        max_request_bytes=max_request_bytes,
    )(guarded(method))


def guarded(method):
    """``method`` with a deadline, whose failures reach the caller typed:
    the database's as ``ServiceUnavailable``, anything unexpected as
    ``InternalError`` with a reference, logged without the exception's text
    (database errors quote the values they choked on). Every entrypoint,
    RPC and HTTP, wraps its method in this."""

    @functools.wraps(method)
    def guarded_method(self, *args, **kwargs):
        config = getattr(self, "config", None) or {}
        deadline = float(config.get("CALL_DEADLINE_S", DEFAULT_CALL_DEADLINE_S))
        timer = eventlet.Timeout(deadline, DeadlinePassed())
        try:
            try:
                result = method(self, *args, **kwargs)
                _finish_database(self)
                return result
            except BaseException:
                # Fired inside psycopg2, the deadline surfaces as a database
                # error; the timer says what really happened.
                if not timer.pending:
                    raise DeadlinePassed() from None
                _finish_database(self)
                raise
            finally:
                timer.cancel()
        except PatientServiceError:
            raise
        except DeadlinePassed:
            # The connection may sit in the middle of a statement to a database
            # that stopped answering: drop it rather than roll it back.
            _abandon_database(self)
            log.warning("%s passed its %ss deadline", method.__name__, deadline)
            raise ServiceUnavailable(SLOW) from None
        except PoolTimeout:
            log.warning("no database connection free for %s", method.__name__)
            raise ServiceUnavailable(SLOW) from None
        except DBAPIError as exc:
            raise _database_error(method.__name__, exc) from None
        except Exception as exc:
            raise internal_error(method.__name__, exc) from None

    return guarded_method


class DeadlinePassed(Exception):
    pass


def _finish_database(service):
    """End the worker's transaction inside the deadline; a connection that
    fails to roll back is dropped, the answer stands."""
    db = getattr(service, "db", None)
    if db is None:
        return
    try:
        db.session.close()
    except DBAPIError:
        db.session.invalidate()


def _abandon_database(service):
    db = getattr(service, "db", None)
    if db is not None:
        db.session.invalidate()


def _database_error(name, exc):
    code = getattr(exc.orig, "pgcode", None)
    if exc.connection_invalidated or (
        code is None and isinstance(exc, OperationalError)
    ):
        log.warning("database unreachable in %s: %s", name, type(exc.orig).__name__)
        return ServiceUnavailable()
    if code in TRANSIENT_SQLSTATES:
        log.warning("database busy in %s: SQLSTATE %s", name, code)
        return ServiceUnavailable(SLOW)
    return internal_error(name, exc)


def internal_error(name, exc):
    """An ``InternalError`` for ``exc``, logged with its type, where it was
    raised and a reference, never its text."""
    reference = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error(
        "unexpected %s in %s, reference %s\n%s",
        type(exc).__name__,
        name,
        reference,
        frames,
    )
    return InternalError(reference)


class CallerProvider(DependencyProvider):
    """Injects the ``Caller`` of the current worker: over HTTP, the token's
    subject; over RPC, the end user named in the call's context data
    (``user_id``) if any, else the calling service."""

    def get_dependency(self, worker_ctx):
        return _caller(worker_ctx)


def _caller(worker_ctx):
    user = worker_ctx.kwargs.get("user")
    if isinstance(user, Principal):
        return http_caller(user, worker_ctx.call_id)

    delivery_id = worker_ctx.data.pop(DELIVERY_KEY, None)
    stack = worker_ctx.call_id_stack
    service = stack[-2].split(".", 1)[0] if len(stack) > 1 else None
    user = worker_ctx.data.get("user_id")
    if isinstance(user, str) and _USER_ID.fullmatch(user):
        actor = user
    else:
        actor = f"service:{service or 'unknown'}"
    return Caller(
        actor=actor,
        service=service,
        call_id=worker_ctx.call_id,
        delivery_id=delivery_id if isinstance(delivery_id, str) else None,
    )


class SettingTimer(Timer):
    """Nameko's timer, its interval read from a setting of the config."""

    def __init__(self, setting, default, **kwargs):
        super().__init__(interval=default, **kwargs)
        self.setting = setting

    def setup(self):
        self.interval = float(self.container.config.get(self.setting, self.interval))
        super().setup()


setting_timer = SettingTimer.decorator
