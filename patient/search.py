"""FHIR-style Patient search with cursor paging.

Pages are in patient id order and a cursor holds the last id returned, so a
record that exists throughout is returned exactly once however the data
changes between pages.
"""

import base64
import hashlib
import json
import re
import uuid

from marshmallow import ValidationError
from sqlalchemy import Text, and_, cast, exists, false, or_, select

from patient.db import prepared, read_only
from patient.encoded import EncodedJson
from patient.errors import InvalidSearch
from patient.index import (
    NAME_SEARCH_PARTS,
    PREFIX_CHARS,
    email_key,
    fold_query,
    phone_search_keys,
)
from patient.models import (
    Patient,
    PatientIdentifier,
    PatientNamePrefix,
    PatientNameToken,
    PatientTelecom,
)
from patient.partialdate import date_range
from patient.schemas import DATE_PREFIXES, SearchCriteria, SearchRequest

# Built once: a marshmallow schema copies its fields when it is made, which
# cost a search more than its query. Loading keeps no state in the schema.
_REQUEST, _CRITERIA = SearchRequest(), SearchCriteria()
_DATE_PARAM = re.compile(r"^([a-z]{2})?(\d{4}(?:-\d{2}(?:-\d{2})?)?)$")


def search_patients(
    session, criteria, count=20, cursor=None, region=None, encoded=False
):
    """A page of patients and the cursor of the next page (None after the
    last). ``encoded``: the patients as ``EncodedJson``, for an answer that
    embeds them without decoding them first."""
    query, limit, fingerprint = search_query(criteria, count, cursor, region, encoded)
    read_only(session)
    rows = session.connection().execute(prepared(query)).all()

    # Known shortcoming: "more" rests on one row read ahead. If that row
    # stops matching before the next page is asked for, the next page is
    # empty. A cursor that holds the search's snapshot (or re-checks the
    # read-ahead row) would close the gap.
    page, more = rows[:limit], len(rows) > limit
    next_cursor = _make_cursor(page[-1].id, fingerprint) if more else None
    patients = [EncodedJson(row[1]) if encoded else row[1] for row in page]
    return {"patients": patients, "next_cursor": next_cursor}


def search_query(criteria, count=20, cursor=None, region=None, encoded=False):
    """The statement a search runs, with one row read ahead; its limit (the
    page size) and the fingerprint cursors carry. Raises ``InvalidSearch``.
    ``encoded``: the resources read as their stored text."""
    # Known shortcoming: the statement is built anew for every search, about
    # a sixth of a search's time in the service. Keeping the built statement
    # per search shape (parameters and value kinds) would skip it.
    request = _load(_REQUEST, {"criteria": criteria, "count": count, "cursor": cursor})
    if not isinstance(criteria, dict):
        raise InvalidSearch({"criteria": ["must be a mapping"]})
    parsed = _load(_CRITERIA, criteria)
    fingerprint = _fingerprint(parsed)
    after = _read_cursor(request["cursor"], fingerprint)

    # The page's ids first, then their resources: the plan then reads the
    # resources of one page only, not of every match it sorts.
    ids = select(Patient.id)
    for condition in _conditions(parsed, region):
        ids = ids.where(condition)
    if after is not None:
        ids = ids.where(Patient.id > after)
    limit = request["count"]
    page = ids.order_by(Patient.id).limit(limit + 1).subquery()
    resource = cast(Patient.resource, Text) if encoded else Patient.resource
    query = (
        select(Patient.id, resource)
        .join(page, Patient.id == page.c.id)
        .order_by(Patient.id)
    )
    return query, limit, fingerprint


def _load(schema, data):
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise InvalidSearch(_messages(exc.messages)) from None
    except (TypeError, AttributeError, ValueError):
        raise InvalidSearch(
            {"criteria": ["must be a mapping of search parameters"]}
        ) from None


def _messages(messages):
    # marshmallow says "Unknown field." for a criterion it does not know.
    out = {}
    for field, found in messages.items():
        items = found if isinstance(found, list) else [str(found)]
        out[str(field)[:64]] = [
            "is not a supported search parameter" if m == "Unknown field." else str(m)
            for m in items
        ]
    return out


def _conditions(parsed, region):
    for value in parsed.get("id_", ()):
        yield _id_condition(value)

    for param, parts in NAME_SEARCH_PARTS.items():
        for value in parsed.get(param, ()):
            yield _name_condition(param, value, parts)

    for value in parsed.get("birthdate", ()):
        yield _birthdate_condition(value)

    if "identifier" in parsed:
        yield _identifier_condition(parsed["identifier"])

    if "phone" in parsed:
        keys = phone_search_keys(parsed["phone"], region)
        if not keys or max(len(k) for k in keys) < 5:
            raise InvalidSearch({"phone": ["must have at least 4 digits"]})
        yield _telecom_condition("phone", keys)

    if "email" in parsed:
        yield _telecom_condition("email", [email_key(parsed["email"])])

    if "gender" in parsed:
        yield Patient.gender == parsed["gender"]

    if "active" in parsed:
        yield Patient.active.is_(parsed["active"])


def _id_condition(value):
    try:
        return Patient.id == uuid.UUID(value)
    except ValueError:
        return false()


def _name_condition(param, value, parts):
    """A short prefix is a stored one, whose patients come in id order; a
    longer one is a range of tokens, which matches few."""
    prefix = fold_query(value)
    if not prefix:
        raise InvalidSearch({param: ["must contain a letter or digit"]})
    if len(prefix) <= PREFIX_CHARS:
        return exists().where(
            PatientNamePrefix.patient_id == Patient.id,
            PatientNamePrefix.parameter == param,
            PatientNamePrefix.prefix == prefix,
        )
    pattern = _escape_like(prefix) + "%"
    return exists().where(
        PatientNameToken.patient_id == Patient.id,
        PatientNameToken.part.in_(parts),
        PatientNameToken.token.like(pattern, escape="\\"),
    )


def _escape_like(text):
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _birthdate_condition(value):
    """FHIR date search: a stored birth date is a range too ("1974" is the
    whole year), compared range against range."""
    match = _DATE_PARAM.match(value)
    prefix = match.group(1) if match else None
    if not match or (prefix and prefix not in DATE_PREFIXES):
        raise InvalidSearch({"birthdate": ["must be [eq|ge|gt|le|lt]YYYY[-MM[-DD]]"]})
    try:
        start, end = date_range(match.group(2))
    except ValueError:
        raise InvalidSearch({"birthdate": ["is not a valid date"]}) from None

    low, high = Patient.birth_date_start, Patient.birth_date_end
    # A stored range starts before it ends, so "low <= end" adds nothing but
    # the upper bound an index range on the start needs.
    within = and_(low >= start, low <= end, high <= end)
    return {
        None: within,
        "eq": within,
        "ge": or_(high > end, within),
        "gt": high > end,
        "le": or_(low < start, within),
        "lt": low < start,
    }[prefix]


def _identifier_condition(token):
    conditions = [PatientIdentifier.patient_id == Patient.id]
    if token["value"] is not None:
        conditions.append(PatientIdentifier.value == token["value"])
    if not token["any_system"]:
        if token["system"] is None:
            conditions.append(PatientIdentifier.system.is_(None))
        else:
            conditions.append(PatientIdentifier.system == token["system"])
    return exists().where(*conditions)


def _telecom_condition(system, keys):
    return exists().where(
        PatientTelecom.patient_id == Patient.id,
        PatientTelecom.system == system,
        PatientTelecom.key.in_(keys),
    )


def _fingerprint(parsed):
    canonical = json.dumps(parsed, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _make_cursor(last_id, fingerprint):
    raw = json.dumps({"after": str(last_id), "q": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _read_cursor(cursor, fingerprint):
    if cursor is None:
        return None
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        data = json.loads(raw)
        after = uuid.UUID(data["after"])
        same_search = data["q"] == fingerprint
    except (ValueError, TypeError, KeyError, AttributeError):
        raise InvalidSearch(
            {"cursor": ["is not a cursor this service issued"]}
        ) from None
    if not same_search:
        raise InvalidSearch({"cursor": ["belongs to a different search"]})
    return after
