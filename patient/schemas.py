"""Wire formats of the service's own requests (not the FHIR resource, which
``patient.fhir`` checks)."""

from marshmallow import Schema, ValidationError, fields, validate

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
