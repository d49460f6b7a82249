"""Idempotency keys and the locks that keep concurrent writes apart.

A write keyed by the caller's ``idempotency_key``, or else by the delivery
of the message that carried it, records its first answer under the key in
the same transaction. A repeat returns that answer; the same key with other
content is refused.
"""

import hashlib
import json
from datetime import UTC, datetime

from sqlalchemy import bindparam, select, text, update
from sqlalchemy.dialects.postgresql import insert as pg_insert

from patient.db import prepared
from patient.errors import IdempotencyKeyReused, InvalidRequest
from patient.models import IdempotencyRecord
from patient.text import UNSAFE_MESSAGE, is_unsafe

MAX_KEY_CHARS = 255


def check_key(idempotency_key):
    if idempotency_key is None:
        return
    is_text = isinstance(idempotency_key, str)
    if not is_text or not 0 < len(idempotency_key) <= MAX_KEY_CHARS:
        message = f"must be a string of 1 to {MAX_KEY_CHARS} characters"
        raise InvalidRequest({"idempotency_key": [message]})
    if is_unsafe(idempotency_key):
        raise InvalidRequest({"idempotency_key": [UNSAFE_MESSAGE]})


def key_for(action, idempotency_key, caller, position=None):
    """The caller's key, or else the delivery's, so that a redelivered
    message is answered from the first delivery; ``(None, None)`` for
    neither."""
    if idempotency_key is not None:
        return action, idempotency_key
    if caller.delivery_id:
        suffix = "" if position is None else f"#{position}"
        return f"delivery:{action}", f"{caller.delivery_id}{suffix}"
    return None, None


def fingerprint(value):
    """A hash of the request, to tell a repeat from a reused key."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def claim(session, scope, key, request_hash):
    """Claim the key for this request, or return the first answer under it.

    The insert waits on a concurrent holder of the same key until it commits
    or rolls back, so two racing requests never both write.
    """
    claimed = session.execute(
        pg_insert(IdempotencyRecord)
        .values(
            scope=scope,
            key=key,
            request_hash=request_hash,
            created_at=datetime.now(UTC),
        )
        .on_conflict_do_nothing()
        .returning(IdempotencyRecord.key)
    ).first()
    if claimed is not None:
        return None

    return answered(session, scope, key, request_hash)


# Built once: making them cost a write more than running them.
_ANSWER = prepared(
    select(IdempotencyRecord.request_hash, IdempotencyRecord.response).where(
        IdempotencyRecord.scope == bindparam("scope"),
        IdempotencyRecord.key == bindparam("key"),
    )
)
_LOCK = prepared(
    text(
        "SELECT pg_advisory_xact_lock(n) FROM"
        " (SELECT unnest(CAST(:numbers AS bigint[])) AS n ORDER BY n) AS s"
    )
)


def answered(session, scope, key, request_hash):
    """The answer kept under the key, or None if the key is new."""
    record = session.connection().execute(_ANSWER, {"scope": scope, "key": key}).first()
    if record is None:
        return None
    if record.request_hash != request_hash:
        raise IdempotencyKeyReused()
    return record.response


def record_answer(session, scope, key, patient_id, response):
    session.execute(
        update(IdempotencyRecord)
        .where(IdempotencyRecord.scope == scope, IdempotencyRecord.key == key)
        .values(patient_id=patient_id, response=response)
    )


def lock_number(name):
    digest = hashlib.blake2b(name.encode("utf-8", "replace"), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def lock(session, numbers):
    """Take transaction-scoped advisory locks, in ascending order."""
    if numbers:
        session.connection().execute(_LOCK, {"numbers": numbers})
