"""Wire formats of the service's own requests (not the FHIR resource, which
``patient.fhir`` checks)."""

from datetime import UTC, datetime, timedelta

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from patient.text import UNSAFE_MESSAGE, is_unsafe

GENDERS = ("male", "female", "other", "unknown")
DATE_PREFIXES = ("eq", "ge", "gt", "le", "lt")


class Text(fields.String):
    """A string the database can store and compare."""

    def _deserialize(self, value, attr, data, **kwargs):
        text = super()._deserialize(value, attr, data, **kwargs)
        if is_unsafe(text):
            raise ValidationError(UNSAFE_MESSAGE)
        return text


class StringOrList(fields.Field):
    """One value, or a list of values that must all match."""

    def __init__(self, inner, max_items=4, **kwargs):
        super().__init__(**kwargs)
        self.inner = inner
        self.max_items = max_items

    def _deserialize(self, value, attr, data, **kwargs):
        values = value if isinstance(value, list) else [value]
        if not 1 <= len(values) <= self.max_items:
            raise ValidationError(f"give 1 to {self.max_items} values")
        return [self.inner.deserialize(v) for v in values]


class IdentifierField(fields.Field):
    """``"system|value"`` or ``"value"`` as in FHIR search, or a mapping
    ``{"system": ..., "value": ...}`` that needs no escaping."""

    def _deserialize(self, value, attr, data, **kwargs):
        if isinstance(value, dict):
            unknown = set(value) - {"system", "value"}
            if unknown or not value:
                raise ValidationError("give system and/or value")
            system, token = value.get("system"), value.get("value")
            for part in (system, token):
                if part is not None and not isinstance(part, str):
                    raise ValidationError("system and value must be strings")
                if part is not None and len(part) > 4096:
                    raise ValidationError("must be at most 4096 characters")
                if part is not None and is_unsafe(part):
                    raise ValidationError(UNSAFE_MESSAGE)
            if token is None and system is None:
                raise ValidationError("give system and/or value")
            return {
                "system": system,
                "value": token,
                "any_system": "system" not in value,
            }
        if not isinstance(value, str) or not value or len(value) > 500:
            raise ValidationError("must be a string of 1 to 500 characters")
        if is_unsafe(value):
            raise ValidationError(UNSAFE_MESSAGE)
        return parse_token(value)


def parse_token(text):
    """Split FHIR's ``system|value`` on the first unescaped ``|``; ``\\|``
    and ``\\\\`` stand for a literal bar and backslash."""
    parts, current, escaped = [], [], False
    for char in text:
        if escaped:
            current.append(char)
            escaped = False
        elif char == "\\":
            escaped = True
        elif char == "|" and not parts:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if escaped:
        current.append("\\")
    parts.append("".join(current))

    if len(parts) == 1:
        return {"system": None, "value": parts[0], "any_system": True}
    system, value = parts
    return {
        "system": system or None,
        "value": value or None,
        "any_system": False,
    }


_name = Text(validate=validate.Length(min=1, max=100))


class SearchCriteria(Schema):
    # FHIR's _id: the patient's id. A patient's own search over HTTP is
    # narrowed with it.
    id_ = StringOrList(Text(validate=validate.Length(min=1, max=64)), data_key="_id")
    name = StringOrList(_name)
    family = StringOrList(_name)
    given = StringOrList(_name)
    birthdate = StringOrList(Text(validate=validate.Length(min=4, max=12)))
    identifier = IdentifierField()
    phone = Text(validate=validate.Length(min=1, max=40))
    email = Text(validate=validate.Length(min=3, max=254))
    gender = Text(validate=validate.OneOf(GENDERS))
    active = fields.Boolean()


class SearchRequest(Schema):
    criteria = fields.Dict(load_default=dict)
    count = fields.Integer(
        strict=True, load_default=20, validate=validate.Range(min=1, max=100)
    )
    cursor = Text(load_default=None, allow_none=True, validate=validate.Length(max=200))


PRIORITIES = ("routine", "urgent")
MODALITIES = ("video", "phone", "in_person")
REQUEST_STATUSES = ("pending", "forwarded", "cancelled", "failed")
MAX_REASON_CHARS = 2000
# How far ahead a preferred window may start.
MAX_LEAD_DAYS = 366
MAX_WINDOW_DAYS = 31
MIN_OFFSET, MAX_OFFSET = timedelta(hours=-12), timedelta(hours=14)


class UtcDateTime(fields.AwareDateTime):
    """A date-time with a real-world UTC offset (-12:00 to +14:00), in a
    year near ours, loaded as UTC."""

    def _deserialize(self, value, attr, data, **kwargs):
        moment = super()._deserialize(value, attr, data, **kwargs)
        offset = moment.utcoffset()
        if not MIN_OFFSET <= offset <= MAX_OFFSET:
            raise ValidationError("has no real-world UTC offset")
        this_year = datetime.now(UTC).year
        if not this_year - 1 <= moment.year <= this_year + 2:
            raise ValidationError("is too far from today")
        return moment.astimezone(UTC)


class PreferredWindow(Schema):
    """When the patient would like the appointment: the start before the
    end, within a month of it, within MAX_LEAD_DAYS from now, and the window
    not over already."""

    start = UtcDateTime(required=True)
    end = UtcDateTime(required=True)

    @validates_schema
    def check_order(self, data, **kwargs):
        now = datetime.now(UTC)
        if data["start"] >= data["end"]:
            raise ValidationError("must be before end", "start")
        if data["end"] - data["start"] > timedelta(days=MAX_WINDOW_DAYS):
            raise ValidationError(
                f"must be at most {MAX_WINDOW_DAYS} days after start", "end"
            )
        if data["end"] <= now:
            raise ValidationError("must not be in the past", "end")
        if data["start"] > now + timedelta(days=MAX_LEAD_DAYS):
            raise ValidationError(
                f"must be within {MAX_LEAD_DAYS} days from now", "start"
            )


def _not_blank(text):
    if not text.strip():
        raise ValidationError("must not be blank")


class NewAppointmentRequest(Schema):
    """What a patient asks for; unknown fields are refused."""

    reason = Text(
        required=True,
        validate=[validate.Length(min=1, max=MAX_REASON_CHARS), _not_blank],
    )
    priority = Text(load_default="routine", validate=validate.OneOf(PRIORITIES))
    modality = Text(required=True, validate=validate.OneOf(MODALITIES))
    preferred_window = fields.Nested(PreferredWindow, load_default=None)


class ListAppointmentRequests(Schema):
    status = Text(load_default=None, validate=validate.OneOf(REQUEST_STATUSES))
    count = fields.Integer(
        strict=True, load_default=20, validate=validate.Range(min=1, max=100)
    )
    cursor = Text(load_default=None, validate=validate.Length(max=200))


class Ticket(Schema):
    id = fields.String()
    position = fields.Integer(allow_none=True)


class AppointmentRequestView(Schema):
    """An appointment request as callers get it."""

    request_id = fields.UUID()
    patient_id = fields.UUID()
    status = fields.String(metadata={"enum": list(REQUEST_STATUSES)})
    version = fields.String()
    reason = fields.String()
    priority = fields.String()
    modality = fields.String()
    preferred_window = fields.Nested(PreferredWindow, allow_none=True)
    ticket = fields.Nested(Ticket, allow_none=True)
    # For a cancelled request the Queue Service had: pending until it
    # confirms, then confirmed (failed once the retries are spent).
    cancellation = fields.String(allow_none=True)
    failure_reason = fields.String(allow_none=True)
    created_at = fields.AwareDateTime()
    updated_at = fields.AwareDateTime()
