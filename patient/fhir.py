"""The shape of an HL7 FHIR R4 Patient resource, and the service's limits.

Element types, cardinality and date formats come from fhir.resources' R4B
Patient model (R4B's Patient is R4's); required code bindings (gender, name
use, telecom system, ...) from the ``enum_values`` that model declares, which
it does not enforce itself. The limits run first, on the raw JSON, so that an
oversized or deeply nested input costs no parsing.
"""

import json
from decimal import Decimal

from fhir.resources.R4B.patient import Patient as PatientModel
from pydantic import BaseModel, ValidationError

from patient.errors import InvalidPatient
from patient.text import UNSAFE_MESSAGE, is_unsafe

MAX_RESOURCE_BYTES = 256 * 1024
MAX_DEPTH = 16
MAX_LIST_ITEMS = 100
MAX_STRING_CHARS = 8 * 1024
# Attachments carry base64 content; they are bounded by the resource limit.
LONG_STRING_KEYS = frozenset({"data"})

# The unique index on (system, value) takes entries up to about 2,700 bytes.
MAX_IDENTIFIER_PART_BYTES = 1000


def validate_patient(resource):
    """Raise ``InvalidPatient`` unless ``resource`` is a valid R4 Patient
    within the service's limits. Returns nothing: the caller keeps the
    resource exactly as given."""
    check_limits(resource)
    check_shape(resource)


def check_shape(resource):
    """The R4 Patient rules, for a resource already within the limits."""
    if resource.get("resourceType") != "Patient":
        raise InvalidPatient({"resourceType": ["must be 'Patient'"]})

    try:
        model = PatientModel.model_validate(resource)
    except ValidationError as exc:
        raise InvalidPatient(_field_errors(exc)) from None
    except (ValueError, TypeError, LookupError, AttributeError):
        # A validator of the model failed in a way pydantic did not wrap (an
        # unknown resourceType in ``contained`` raises KeyError).
        raise InvalidPatient({"resource": ["is not a valid Patient"]}) from None

    errors = {}
    _check_elements(model, resource, "", errors)
    _check_identifier_sizes(resource, errors)
    if errors:
        raise InvalidPatient(errors)


def check_limits(resource):
    if not isinstance(resource, dict):
        raise InvalidPatient({"resource": ["must be a JSON object"]})

    errors = {}
    stack = [(resource, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise InvalidPatient(
                {path or "resource": [f"nested deeper than {MAX_DEPTH}"]}
            )

        if isinstance(node, (dict, list)) and not node and path:
            # FHIR JSON has no empty objects or arrays (ele-1).
            errors.setdefault(path, []).append("must not be empty")
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str) or is_unsafe(key):
                    raise InvalidPatient({path or "resource": ["has an invalid key"]})
                child = f"{path}.{key}" if path else key
                stack.append((value, child, depth + 1))
                if isinstance(value, str):
                    _check_string(value, child, key, errors)
                elif value is None:
                    errors.setdefault(child, []).append("must not be null")
            # Known shortcoming: FHIR lets a list of primitives hold null to
            # line up with its "_name" list of extensions ("given": ["Jo",
            # null]); such lists are refused here and by the model. Accepting
            # them needs the pairing checked, not just nulls allowed.
        elif isinstance(node, list):
            if len(node) > MAX_LIST_ITEMS:
                raise InvalidPatient({path: [f"has more than {MAX_LIST_ITEMS} items"]})
            for index, value in enumerate(node):
                child = f"{path}[{index}]"
                stack.append((value, child, depth + 1))
                if isinstance(value, str):
                    _check_string(value, child, "", errors)
        elif not (node is None or isinstance(node, (str, bool, int, float))):
            raise InvalidPatient({path or "resource": ["is not a JSON value"]})

    if errors:
        raise InvalidPatient(errors)

    if len(json.dumps(resource, ensure_ascii=False).encode()) > MAX_RESOURCE_BYTES:
        raise InvalidPatient(
            {"resource": [f"is larger than {MAX_RESOURCE_BYTES // 1024} KiB"]}
        )


def _check_identifier_sizes(resource, errors):
    for index, identifier in enumerate(resource.get("identifier", ())):
        for part in ("system", "value"):
            text = identifier.get(part)
            if text and len(text.encode()) > MAX_IDENTIFIER_PART_BYTES:
                errors.setdefault(f"identifier[{index}].{part}", []).append(
                    f"is longer than {MAX_IDENTIFIER_PART_BYTES} bytes"
                )


def _check_string(value, path, key, errors):
    if len(value) > MAX_STRING_CHARS and key not in LONG_STRING_KEYS:
        errors.setdefault(path, []).append(
            f"is longer than {MAX_STRING_CHARS} characters"
        )
    elif is_unsafe(value):
        errors.setdefault(path, []).append(UNSAFE_MESSAGE)
    elif not value:
        errors.setdefault(path, []).append("must not be empty")


def _field_errors(exc):
    errors = {}
    for error in exc.errors(include_url=False, include_input=False):
        path = _path(error["loc"])
        errors.setdefault(path or "resource", []).append(_message(error))
    return errors


def _path(loc):
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part not in ("resource_type",):
            path += f".{part}" if path else str(part)
    return path


def _message(error):
    kind = error["type"]
    if kind == "extra_forbidden":
        return "is not an element of R4 Patient"
    if kind == "missing":
        return "is required"
    message = error["msg"]
    message = message.removeprefix("Value error, ")
    # fhir.resources quotes the offending value in a few messages; keep the
    # rule and drop the rest.
    return message.split(":")[0].strip() or "is invalid"


def _check_elements(model, raw, path, errors):
    """Walk the parsed model beside the raw JSON: codes must be in their
    required value set, and primitives must have their JSON type (pydantic
    would take "yes" for a boolean and 1 for true, and the service stores
    the raw JSON)."""
    for name, field in type(model).model_fields.items():
        value = getattr(model, name, None)
        key = field.alias or name
        if value is None or key not in raw:
            continue
        child = f"{path}.{key}" if path else key
        allowed = (field.json_schema_extra or {}).get("enum_values")
        if allowed and isinstance(value, str) and value not in allowed:
            errors.setdefault(child, []).append("must be one of " + ", ".join(allowed))
        if isinstance(value, list):
            for index, (item, raw_item) in enumerate(
                zip(value, raw[key], strict=False)
            ):
                _check_element(item, raw_item, f"{child}[{index}]", errors)
        else:
            _check_element(value, raw[key], child, errors)


def _check_element(value, raw, path, errors):
    if isinstance(value, BaseModel):
        if isinstance(raw, dict):
            _check_elements(value, raw, path, errors)
        return
    if isinstance(value, bool):
        expected, ok = "a boolean", isinstance(raw, bool)
    elif isinstance(value, int):
        expected, ok = "an integer", isinstance(raw, int) and not isinstance(raw, bool)
    elif isinstance(value, (float, Decimal)):
        expected = "a number"
        ok = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    else:
        expected, ok = "a string", isinstance(raw, str)
    if not ok:
        errors.setdefault(path, []).append(f"must be {expected}")
