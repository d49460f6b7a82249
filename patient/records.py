"""Registering, reading, updating and deactivating patients.

Every function takes an open SQLAlchemy session and a ``Caller`` and knows
nothing of AMQP or HTTP. Writes commit here, each in one transaction with
its audit record and its idempotency record.
"""

import copy
import logging
import re
import uuid
from datetime import UTC, datetime

from sqlalchemy import delete, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from patient import audit, idempotency
from patient.errors import (
    DuplicatePatient,
    IdempotencyKeyReused,
    InvalidPatient,
    InvalidRequest,
    PatientNotFound,
    VersionConflict,
)
from patient.fhir import check_limits, check_shape
from patient.index import search_keys
from patient.models import (
    IdempotencyRecord,
    Patient,
    PatientIdentifier,
    PatientNameToken,
    PatientTelecom,
)
from patient.text import UNSAFE_MESSAGE, is_unsafe

log = logging.getLogger(__name__)

_VERSION = re.compile(r"[0-9]{1,9}")
# About 50 ms of work an entry: a full batch stays well within the deadline
# even with a few running at once.
MAX_BATCH = 100

CREATED = "created"
REPLAYED = "replayed"


def register_patient(session, resource, caller, idempotency_key=None, region=None):
    """Store a new patient; return the stored resource.

    With a key seen before and the same resource, the first answer comes
    back and nothing is written.
    """
    idempotency.check_key(idempotency_key)
    check_limits(resource)
    outcome, stored = _register(
        session, resource, caller, idempotency_key, None, region
    )
    session.commit()
    return stored


def register_patients(session, entries, caller, region=None):
    """Register many patients in one transaction, each under its own
    savepoint; return a result for each entry, in order.

    An entry is ``{"resource": {...}, "idempotency_key": "..."}``. A result is
    ``{"status": "created" | "replayed", "id", "versionId"}`` or
    ``{"status": "duplicate", "existing_id"}``, ``{"status": "invalid",
    "errors"}``, ``{"status": "key-reused"}``.
    """
    if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_BATCH:
        raise InvalidRequest(
            {"entries": [f"must be a list of 1 to {MAX_BATCH} entries"]}
        )

    # Lock every identifier and key of the batch up front, in one order:
    # two batches that share some then wait for each other, never deadlock.
    resources = [e.get("resource") for e in entries if isinstance(e, dict)]
    keys = [
        ("register", e.get("idempotency_key")) for e in entries if isinstance(e, dict)
    ]
    idempotency.lock(session, _lock_keys(resources, keys))

    results = []
    for position, entry in enumerate(entries):
        results.append(_register_entry(session, entry, position, caller, region))
    session.commit()
    return results


def _register_entry(session, entry, position, caller, region):
    if not isinstance(entry, dict) or "resource" not in entry:
        return {"status": "invalid", "errors": {"entry": ["must hold a resource"]}}
    if set(entry) - {"resource", "idempotency_key"}:
        return {"status": "invalid", "errors": {"entry": ["has unknown keys"]}}
    try:
        idempotency.check_key(entry.get("idempotency_key"))
        check_limits(entry["resource"])
        outcome, stored = _register(
            session,
            entry["resource"],
            caller,
            entry.get("idempotency_key"),
            position,
            region,
            locked=True,
        )
    except (InvalidPatient, InvalidRequest) as exc:
        return {"status": "invalid", "errors": exc.errors}
    except DuplicatePatient as exc:
        return {
            "status": "duplicate",
            "existing_id": exc.existing_id,
            "system": exc.system,
        }
    except IdempotencyKeyReused:
        return {"status": "key-reused"}
    return {
        "status": outcome,
        "id": stored["id"],
        "versionId": stored["meta"]["versionId"],
    }


def _register(
    session, resource, caller, idempotency_key, position, region, locked=False
):
    """Register one resource; ``locked`` when the batch holds its locks."""
    scope, key = idempotency.key_for("register", idempotency_key, caller, position)
    request_hash = idempotency.fingerprint(resource)
    # A repeat costs one read: its answer is there, validated the first time.
    if key is not None and (
        seen := idempotency.answered(session, scope, key, request_hash)
    ):
        return REPLAYED, seen

    patient_id = uuid.uuid4()
    now = datetime.now(UTC)
    stored = _with_server_fields(resource, patient_id, 1, now)
    check_shape(stored)

    if not locked:
        idempotency.lock(session, _lock_keys([stored], [(scope, key)]))
    keys = search_keys(stored, region)

    # One savepoint holds the key's claim and the writes: a duplicate undoes
    # both, so a refused entry of a batch leaves its key free.
    try:
        with session.begin_nested():
            if key is not None:
                replay = idempotency.claim(session, scope, key, request_hash)
                if replay is not None:
                    return REPLAYED, replay
            session.execute(
                insert(Patient),
                [_patient_row(patient_id, 1, stored, now, keys, created_at=now)],
            )
            _write_search_keys(session, patient_id, keys)
            audit.record(session, "create", caller, now, patient_id, 1)
            if key is not None:
                idempotency.record_answer(session, scope, key, patient_id, stored)
    except IntegrityError:
        raise _duplicate(session, keys) from None

    log.info("registered patient %s", patient_id)
    return CREATED, stored


def get_patient(session, patient_id):
    row = find_row(session, patient_id)
    return row.resource


def find_patient_by_identifier(session, system, value):
    for name, given in (("system", system), ("value", value)):
        if not isinstance(given, str) or not given or len(given) > 4096:
            raise InvalidRequest({name: ["must be a string of 1 to 4096 characters"]})
        if is_unsafe(given):
            raise InvalidRequest({name: [UNSAFE_MESSAGE]})
    resource = session.execute(
        select(Patient.resource)
        .join(PatientIdentifier, PatientIdentifier.patient_id == Patient.id)
        .where(PatientIdentifier.system == system, PatientIdentifier.value == value)
        .limit(1)
    ).scalar_one_or_none()
    if resource is None:
        raise PatientNotFound()
    return resource


def update_patient(
    session, patient_id, resource, expected_version, caller, region=None
):
    """Replace the resource if it is still at ``expected_version``."""
    expected = _version(expected_version, required=True)
    check_limits(resource)
    if "id" in resource and not _same_id(resource["id"], patient_id):
        raise InvalidPatient({"id": ["must be the id of the patient updated"]})

    scope, key = idempotency.key_for("update", None, caller, None)
    request_hash = idempotency.fingerprint([str(patient_id), resource, expected])
    try:
        with session.begin_nested():
            if key is not None:
                replay = idempotency.claim(session, scope, key, request_hash)
                if replay is not None:
                    return replay

            row = find_row(session, patient_id, lock=True)
            if row.version != expected:
                raise VersionConflict(str(row.id), expected, row.version)
            # The identifiers it gives up too: two updates swapping
            # identifiers would otherwise wait on each other.
            idempotency.lock(session, _lock_keys([resource, row.resource], []))
            version, now = row.version + 1, datetime.now(UTC)
            stored = _with_server_fields(resource, row.id, version, now)
            check_shape(stored)

            keys = search_keys(stored, region)
            _replace(session, row.id, version, stored, now, keys)
            audit.record(session, "update", caller, now, row.id, version)
            if key is not None:
                idempotency.record_answer(session, scope, key, row.id, stored)
    except IntegrityError:
        raise _duplicate(session, keys, ignore=row.id) from None
    session.commit()
    log.info("updated patient %s to version %s", row.id, version)
    return stored


def deactivate_patient(session, patient_id, caller, expected_version=None, region=None):
    """Mark the patient inactive: a new version, still readable and
    searchable. Deactivating an inactive patient changes nothing."""
    expected = _version(expected_version, required=False)
    row = find_row(session, patient_id, lock=True)
    if row.resource.get("active") is False:
        session.commit()
        return row.resource
    if expected is not None and row.version != expected:
        raise VersionConflict(str(row.id), expected, row.version)

    version, now = row.version + 1, datetime.now(UTC)
    stored = _with_server_fields(
        {**row.resource, "active": False}, row.id, version, now
    )
    session.execute(
        update(Patient)
        .where(Patient.id == row.id)
        .values(version=version, resource=stored, active=False, last_updated=now)
    )
    audit.record(session, "deactivate", caller, now, row.id, version)
    session.commit()
    log.info("deactivated patient %s at version %s", row.id, version)
    return stored


def find_row(session, patient_id, lock=False):
    key, row = by_id(session, Patient, patient_id, "patient_id", lock)
    if row is None:
        raise PatientNotFound(str(key) if key else "")
    return row


def by_id(session, model, raw_id, name, lock=False):
    """``(key, row)`` for a row whose primary key is the UUID ``raw_id``;
    the row is None when there is none or the id is malformed."""
    if isinstance(raw_id, uuid.UUID):
        key = raw_id
    elif not isinstance(raw_id, str):
        raise InvalidRequest({name: ["must be a string"]})
    else:
        try:
            key = uuid.UUID(raw_id) if len(raw_id) <= 64 else None
        except ValueError:
            key = None
    if key is None:
        return None, None
    query = select(model).where(model.id == key)
    if lock:
        query = query.with_for_update()
    return key, session.execute(query).scalar_one_or_none()


def _same_id(one, other):
    try:
        return uuid.UUID(str(one)[:64]) == uuid.UUID(str(other)[:64])
    except ValueError:
        return False


def _version(value, required):
    if value is None and not required:
        return None
    if isinstance(value, bool):
        value = None
    elif isinstance(value, str) and _VERSION.fullmatch(value):
        value = int(value)
    if not isinstance(value, int) or value < 1:
        raise InvalidRequest(
            {"expected_version": ["must be a positive version number"]}
        )
    return value


def _lock_keys(resources, keys):
    """Advisory lock numbers for the identifiers of ``resources`` and the
    idempotency ``keys``: the rows whose inserts could wait on each other."""
    names = {f"k|{scope}|{key}" for scope, key in keys if isinstance(key, str)}
    for resource in resources:
        identifiers = resource.get("identifier") if isinstance(resource, dict) else None
        for identifier in identifiers if isinstance(identifiers, list) else ():
            if isinstance(identifier, dict):
                system, value = identifier.get("system"), identifier.get("value")
                if isinstance(system, str) and isinstance(value, str):
                    names.add(f"i|{system}|{value}")
    return sorted(idempotency.lock_number(name) for name in names)


def _with_server_fields(resource, patient_id, version, now):
    stored = copy.deepcopy(resource)
    meta = stored.get("meta", {})
    if not isinstance(meta, dict):
        raise InvalidPatient({"meta": ["must be an object"]})
    stored["id"] = str(patient_id)
    stored["meta"] = {
        **meta,
        "versionId": str(version),
        "lastUpdated": now.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
    }
    return stored


def _patient_row(patient_id, version, stored, now, keys, created_at=None):
    row = {
        "id": patient_id,
        "version": version,
        "resource": stored,
        "active": keys.active,
        "gender": keys.gender,
        "birth_date_start": keys.birth_date_start,
        "birth_date_end": keys.birth_date_end,
        "last_updated": now,
    }
    if created_at is not None:
        row["created_at"] = created_at
    return row


def _write_search_keys(session, patient_id, keys):
    if keys.identifiers:
        session.execute(
            insert(PatientIdentifier),
            [
                {"patient_id": patient_id, "system": s, "value": v}
                for s, v in keys.identifiers
            ],
        )
    if keys.name_tokens:
        session.execute(
            insert(PatientNameToken),
            [
                {"patient_id": patient_id, "part": p, "token": t}
                for p, t in keys.name_tokens
            ],
        )
    if keys.telecoms:
        session.execute(
            insert(PatientTelecom),
            [
                {"patient_id": patient_id, "system": s, "key": k}
                for s, k in keys.telecoms
            ],
        )


def _replace(session, patient_id, version, stored, now, keys):
    row = _patient_row(patient_id, version, stored, now, keys)
    session.execute(update(Patient).where(Patient.id == patient_id).values(**row))
    for table in (PatientIdentifier, PatientNameToken, PatientTelecom):
        session.execute(delete(table).where(table.patient_id == patient_id))
    _write_search_keys(session, patient_id, keys)


def _duplicate(session, keys, ignore=None):
    """The error for a resource whose identifier another patient holds."""
    enforced = [(s, v) for s, v in keys.identifiers if s and v]
    query = select(PatientIdentifier.patient_id, PatientIdentifier.system).where(
        tuple_(PatientIdentifier.system, PatientIdentifier.value).in_(enforced)
    )
    if ignore is not None:
        query = query.where(PatientIdentifier.patient_id != ignore)
    # The longest-held identifier names the patient, whatever the plan.
    query = query.order_by(PatientIdentifier.id).limit(1)
    holder = session.execute(query).first() if enforced else None
    if holder is None:
        # The constraint fired for a holder that has since changed its
        # identifiers; the caller may simply retry.
        return DuplicatePatient("unknown")
    log.info("refused a duplicate of patient %s", holder.patient_id)
    return DuplicatePatient(str(holder.patient_id), holder.system)


def purge_delivery_records(session, older_than):
    """Forget the answers kept for redelivered messages once no broker would
    redeliver them. Callers' own idempotency keys are kept: an import re-run
    months later must still create nothing new."""
    deleted = session.execute(
        delete(IdempotencyRecord).where(
            IdempotencyRecord.scope.like("delivery:%"),
            IdempotencyRecord.created_at < older_than,
        )
    ).rowcount
    session.commit()
    return deleted
