"""Registering, reading, updating and deactivating patients.

Every function takes an open SQLAlchemy session and a ``Caller`` and knows
nothing of AMQP or HTTP. Writes commit here, each in one transaction with
its audit record and its idempotency record.
"""

import copy
import logging
import re
import time
import uuid
from datetime import UTC, datetime

from sqlalchemy import delete, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from patient import audit, idempotency
from patient.db import insert_all, read_first
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
    AuditEvent,
    IdempotencyRecord,
    Patient,
    PatientIdentifier,
    PatientNamePrefix,
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
    back and nothing is written. Five round trips: the transaction's start,
    the locks, the key's read, every row in one statement, the commit.
    """
    idempotency.check_key(idempotency_key)
    check_limits(resource)
    scope, key = idempotency.key_for("register", idempotency_key, caller)
    request_hash = idempotency.fingerprint(resource)

    # With the key and the identifiers locked, no one else can take them
    # before this commits. A repeat costs the read of its answer, which was
    # validated the first time.
    idempotency.lock(session, _lock_keys([resource], [(scope, key)]))
    if key is not None and (
        seen := idempotency.answered(session, scope, key, request_hash)
    ):
        session.rollback()
        return seen

    patient_id, now = uuid.uuid4(), datetime.now(UTC)
    stored = _with_server_fields(resource, patient_id, 1, now)
    check_shape(stored)
    keys = search_keys(stored, region)
    rows = _Rows(caller, now)
    rows.add(patient_id, stored, keys)
    if key is not None:
        rows.answer(scope, key, request_hash, patient_id, stored)
    try:
        insert_all(session, rows.writes())
    except IntegrityError:
        # An identifier is taken (the locks keep the key free): name who
        # holds it.
        session.rollback()
        raise _duplicate(session, keys) from None
    session.commit()
    log.info("registered patient %s", patient_id)
    return stored


class _Rows:
    """The rows of new patients, to write with ``insert_all``."""

    def __init__(self, caller, now):
        self.caller, self.now = caller, now
        self.patients, self.audit, self.records = [], [], []
        self.keys = [[] for _ in SEARCH_KEY_TABLES]

    def add(self, patient_id, stored, keys):
        self.patients.append(
            patient_row(patient_id, 1, stored, self.now, keys, created_at=self.now)
        )
        for rows, more in zip(
            self.keys, search_key_rows(patient_id, keys), strict=True
        ):
            rows.extend(more)
        self.audit.append(audit.row("create", self.caller, self.now, patient_id, 1))

    def answer(self, scope, key, request_hash, patient_id, stored):
        self.records.append(
            {
                "scope": scope,
                "key": key,
                "request_hash": request_hash,
                "patient_id": patient_id,
                "response": stored,
                "created_at": self.now,
            }
        )

    def writes(self):
        return [
            (Patient, self.patients),
            *zip(SEARCH_KEY_TABLES, self.keys, strict=True),
            (AuditEvent, self.audit),
            (IdempotencyRecord, self.records),
        ]


def register_patients(session, entries, caller, region=None):
    """Register many patients in one transaction, each entry refused or
    stored on its own; return a result for each entry, in order.

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

    # With every identifier and key locked, what is already taken can be
    # read up front and the batch written in a few statements. Anything the
    # reading missed (a delivery key claimed meanwhile) is a constraint
    # violation: the batch then goes again entry by entry, each under its
    # own savepoint.
    try:
        with session.begin_nested():
            results = _register_batch(session, entries, caller, region)
    except IntegrityError:
        results = [
            _register_entry(session, entry, position, caller, region)
            for position, entry in enumerate(entries)
        ]
    session.commit()
    return results


def _register_batch(session, entries, caller, region):
    """``register_patients`` in bulk, for a batch whose locks are held."""
    batch = _Batch(session, entries, caller)
    results = []
    for position, entry in enumerate(entries):
        results.append(batch.register(entry, position, region))
        # Entries cost CPU and no I/O until the writes: give other work,
        # and the call's deadline, their turn between them (a green sleep
        # where the service runs; nothing in a plain process).
        time.sleep(0)
    batch.write()
    return results


class _Batch:
    """The entries of one batch: what the database already holds of their
    keys and identifiers, read once, and the rows to write at the end."""

    def __init__(self, session, entries, caller):
        self.session = session
        self.caller = caller
        self.now = datetime.now(UTC)
        self.keys = [
            idempotency.key_for("register", _entry_key(e), caller, position)
            for position, e in enumerate(entries)
        ]
        self.answers = self._answers()
        self.holders = self._holders(entries)
        self.rows = _Rows(caller, self.now)

    def register(self, entry, position, region):
        return _entry_result(
            entry,
            lambda resource, _: self._register(resource, self.keys[position], region),
        )

    def _register(self, resource, scope_key, region):
        request_hash = idempotency.fingerprint(resource)
        if scope_key in self.answers:
            seen_hash, answer = self.answers[scope_key]
            if seen_hash != request_hash:
                raise IdempotencyKeyReused()
            return REPLAYED, answer

        patient_id = uuid.uuid4()
        stored = _with_server_fields(resource, patient_id, 1, self.now)
        check_shape(stored)
        keys = search_keys(stored, region)
        held = [
            self.holders[identifier]
            for identifier in keys.identifiers
            if identifier in self.holders
        ]
        if held:
            _, holder, system = min(held)
            log.info("refused a duplicate of patient %s", holder)
            raise DuplicatePatient(str(holder), system)

        position = len(self.rows.patients)
        for index, identifier in enumerate(keys.identifiers):
            if all(identifier):
                # After every holder already stored, in the order written.
                self.holders[identifier] = (
                    (1, position, index),
                    patient_id,
                    identifier[0],
                )
        self.rows.add(patient_id, stored, keys)
        scope, key = scope_key
        if key is not None:
            self.answers[scope_key] = (request_hash, stored)
            self.rows.answer(scope, key, request_hash, patient_id, stored)
        return CREATED, stored

    def write(self):
        insert_all(self.session, self.rows.writes())
        for row in self.rows.patients:
            log.info("registered patient %s", row["id"])

    def _answers(self):
        # A key that is not a storable string is refused with its entry.
        wanted = {
            (scope, key)
            for scope, key in self.keys
            if isinstance(key, str)
            and 0 < len(key) <= idempotency.MAX_KEY_CHARS
            and not is_unsafe(key)
        }
        if not wanted:
            return {}
        found = self.session.execute(
            select(
                IdempotencyRecord.scope,
                IdempotencyRecord.key,
                IdempotencyRecord.request_hash,
                IdempotencyRecord.response,
            ).where(tuple_(IdempotencyRecord.scope, IdempotencyRecord.key).in_(wanted))
        )
        return {(r.scope, r.key): (r.request_hash, r.response) for r in found}

    def _holders(self, entries):
        """The patient holding each enforced identifier of the batch, the
        longest-held first, as ``_duplicate`` names them."""
        resources = [e.get("resource") for e in entries if isinstance(e, dict)]
        wanted = {pair for pair in _identifiers(resources) if all(pair)}
        if not wanted:
            return {}
        found = self.session.execute(
            select(
                PatientIdentifier.id,
                PatientIdentifier.patient_id,
                PatientIdentifier.system,
                PatientIdentifier.value,
            ).where(
                tuple_(PatientIdentifier.system, PatientIdentifier.value).in_(wanted)
            )
        )
        return {
            (r.system, r.value): ((0, r.id, 0), r.patient_id, r.system) for r in found
        }


def _entry_key(entry):
    return entry.get("idempotency_key") if isinstance(entry, dict) else None


def _register_entry(session, entry, position, caller, region):
    return _entry_result(
        entry,
        lambda resource, key: _register_locked(
            session, resource, caller, key, position, region
        ),
    )


def _entry_result(entry, register):
    """The result of one batch entry: ``register(resource, key)`` returns the
    outcome and the stored resource, or raises what the entry's status says."""
    if not isinstance(entry, dict) or "resource" not in entry:
        return {"status": "invalid", "errors": {"entry": ["must hold a resource"]}}
    if set(entry) - {"resource", "idempotency_key"}:
        return {"status": "invalid", "errors": {"entry": ["has unknown keys"]}}
    try:
        idempotency.check_key(entry.get("idempotency_key"))
        check_limits(entry["resource"])
        outcome, stored = register(entry["resource"], entry.get("idempotency_key"))
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


def _register_locked(session, resource, caller, idempotency_key, position, region):
    """Register one entry of a batch that holds its locks, under a savepoint
    of its own."""
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
    keys = search_keys(stored, region)

    # One savepoint holds the key's claim and the writes: a duplicate undoes
    # both, so a refused entry of a batch leaves its key free.
    try:
        with session.begin_nested():
            if key is not None:
                replay = idempotency.claim(session, scope, key, request_hash)
                if replay is not None:
                    return REPLAYED, replay
            rows = _Rows(caller, now)
            rows.add(patient_id, stored, keys)
            insert_all(session, rows.writes())
            if key is not None:
                idempotency.record_answer(session, scope, key, patient_id, stored)
    except IntegrityError:
        raise _duplicate(session, keys) from None

    log.info("registered patient %s", patient_id)
    return CREATED, stored


# The hot reads, written out: see ``read_first``.
_GET_PATIENT = "SELECT resource FROM patients WHERE id = %(id)s"
_FIND_BY_IDENTIFIER = (
    "SELECT p.resource FROM patients p"
    " JOIN patient_identifiers i ON i.patient_id = p.id"
    " WHERE i.system = %(system)s AND i.value = %(value)s LIMIT 1"
)


def get_patient(session, patient_id):
    key = row_key(patient_id, "patient_id")
    row = key and read_first(session, "get_patient", _GET_PATIENT, {"id": str(key)})
    if not row:
        raise PatientNotFound(str(key) if key else "")
    return row[0]


def find_patient_by_identifier(session, system, value):
    for name, given in (("system", system), ("value", value)):
        if not isinstance(given, str) or not given or len(given) > 4096:
            raise InvalidRequest({name: ["must be a string of 1 to 4096 characters"]})
        if is_unsafe(given):
            raise InvalidRequest({name: [UNSAFE_MESSAGE]})
    row = read_first(
        session,
        "find_by_identifier",
        _FIND_BY_IDENTIFIER,
        {"system": system, "value": value},
    )
    if row is None:
        raise PatientNotFound()
    return row[0]


def update_patient(
    session, patient_id, resource, expected_version, caller, region=None, check=None
):
    """Replace the resource if it is still at ``expected_version``.

    ``check(current, new)``, if given, may refuse the change by raising; it
    sees the current resource under the row's lock.
    """
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
            if check is not None:
                check(row.resource, resource)
            # The identifiers it gives up too: two updates swapping
            # identifiers would otherwise wait on each other.
            idempotency.lock(session, _lock_keys([resource, row.resource], []))
            version, now = row.version + 1, datetime.now(UTC)
            stored = _with_server_fields(resource, row.id, version, now)
            check_shape(stored)

            keys = search_keys(stored, region)
            audit_row = audit.row("update", caller, now, row.id, version)
            _replace(session, row.id, version, stored, now, keys, audit_row)
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
    key = row_key(raw_id, name)
    if key is None:
        return None, None
    query = select(model).where(model.id == key)
    if lock:
        query = query.with_for_update()
    return key, session.execute(query).scalar_one_or_none()


def row_key(raw_id, name):
    """The UUID ``raw_id`` names, or None for one that names no row."""
    if isinstance(raw_id, uuid.UUID):
        return raw_id
    if not isinstance(raw_id, str):
        raise InvalidRequest({name: ["must be a string"]})
    try:
        return uuid.UUID(raw_id) if len(raw_id) <= 64 else None
    except ValueError:
        return None


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
    names.update(f"i|{system}|{value}" for system, value in _identifiers(resources))
    return sorted(idempotency.lock_number(name) for name in names)


def _identifiers(resources):
    """(system, value) of every identifier with both, in resources not yet
    validated."""
    for resource in resources:
        identifiers = resource.get("identifier") if isinstance(resource, dict) else None
        for identifier in identifiers if isinstance(identifiers, list) else ():
            if isinstance(identifier, dict):
                system, value = identifier.get("system"), identifier.get("value")
                if isinstance(system, str) and isinstance(value, str):
                    yield system, value


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


def patient_row(patient_id, version, stored, now, keys, created_at=None):
    """The ``patients`` row of a stored resource and its search keys."""
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


SEARCH_KEY_TABLES = (
    PatientIdentifier,
    PatientNameToken,
    PatientNamePrefix,
    PatientTelecom,
)


def search_key_rows(patient_id, keys):
    """The rows of each table of ``SEARCH_KEY_TABLES`` for a patient's
    search keys, in that order."""
    return (
        [
            {"patient_id": patient_id, "system": s, "value": v}
            for s, v in keys.identifiers
        ],
        [
            {"patient_id": patient_id, "part": p, "token": t}
            for p, t in keys.name_tokens
        ],
        [
            {"patient_id": patient_id, "parameter": p, "prefix": x}
            for p, x in keys.name_prefixes
        ],
        [{"patient_id": patient_id, "system": s, "key": k} for s, k in keys.telecoms],
    )


def _search_key_writes(patient_id, keys):
    """``(table, rows)`` of a patient's search keys, for ``insert_all``."""
    return list(zip(SEARCH_KEY_TABLES, search_key_rows(patient_id, keys), strict=True))


# Every search key of one patient, in one statement. Table names come from
# the models' metadata.
_DELETE_SEARCH_KEYS = "WITH {} SELECT 1".format(
    ", ".join(
        f"d{number} AS (DELETE FROM {table.__tablename__}"  # noqa: S608
        " WHERE patient_id = %(patient_id)s)"
        for number, table in enumerate(SEARCH_KEY_TABLES)
    )
)


def _replace(session, patient_id, version, stored, now, keys, audit_row):
    """The new version in place of the current one: its row, its search keys
    in place of the old ones, and its audit row, in three statements."""
    row = patient_row(patient_id, version, stored, now, keys)
    session.execute(update(Patient).where(Patient.id == patient_id).values(**row))
    session.connection().exec_driver_sql(
        _DELETE_SEARCH_KEYS, {"patient_id": str(patient_id)}
    )
    insert_all(
        session, [*_search_key_writes(patient_id, keys), (AuditEvent, [audit_row])]
    )


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
