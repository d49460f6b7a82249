"""Nameko extensions of the service: the RPC entrypoint and the caller."""

import functools
import inspect
import logging
import traceback
import uuid

from nameko.exceptions import IncorrectSignature
from nameko.extensions import DependencyProvider
from nameko.rpc import Rpc
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from patient.caller import Caller
from patient.errors import (
    EXPECTED_ERRORS,
    InternalError,
    PatientServiceError,
    ServiceUnavailable,
)

log = logging.getLogger(__name__)

DELIVERY_KEY = "patient_service.delivery_id"


class PatientRpc(Rpc):
    """Nameko's RPC entrypoint, keeping the message's correlation id.

    A message redelivered after a crash has the same correlation id; writes
    made without an idempotency key use it to answer the redelivery from the
    first delivery instead of writing twice.
    """

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
        # Nameko copies every context key into the headers of onward calls;
        # CallerProvider takes this one out before the worker runs.
        data[DELIVERY_KEY] = message.properties.get("correlation_id")
        return data


def rpc(method=None, *, sensitive_arguments=()):
    """A PatientRpc entrypoint whose unexpected errors reach the caller as
    ``InternalError`` with a reference, and are logged without the
    exception's text (database errors quote the values they choked on)."""

    if method is None:
        return functools.partial(rpc, sensitive_arguments=sensitive_arguments)

    @functools.wraps(method)
    def guarded(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except PatientServiceError:
            raise
        except (OperationalError, PoolTimeout) as exc:
            log.warning(
                "database unavailable in %s: %s", method.__name__, type(exc).__name__
            )
            raise ServiceUnavailable() from None
        except DBAPIError as exc:
            if exc.connection_invalidated:
                raise ServiceUnavailable() from None
            raise _internal(method, exc) from None
        except Exception as exc:
            raise _internal(method, exc) from None

    return PatientRpc.decorator(
        expected_exceptions=EXPECTED_ERRORS, sensitive_arguments=sensitive_arguments
    )(guarded)


def _internal(method, exc):
    reference = uuid.uuid4().hex[:12]
    frames = "".join(traceback.format_tb(exc.__traceback__))
    log.error(
        "unexpected %s in %s, reference %s\n%s",
        type(exc).__name__,
        method.__name__,
        reference,
        frames,
    )
    return InternalError(reference)


class CallerProvider(DependencyProvider):
    """Injects the ``Caller`` of the current worker: the end user named in the
    call's context data (``user_id``) if any, else the calling service."""

    def get_dependency(self, worker_ctx):
        return _caller(worker_ctx)


def _caller(worker_ctx):
    delivery_id = worker_ctx.data.pop(DELIVERY_KEY, None)
    stack = worker_ctx.call_id_stack
    service = stack[-2].split(".", 1)[0] if len(stack) > 1 else None
    user = worker_ctx.data.get("user_id")
    actor = str(user)[:200] if user else f"service:{service or 'unknown'}"
    return Caller(
        actor=actor,
        service=service,
        call_id=worker_ctx.call_id,
        delivery_id=delivery_id if isinstance(delivery_id, str) else None,
    )
