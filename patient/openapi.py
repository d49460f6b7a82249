"""The OpenAPI 3.1 document of the HTTP API, built with apispec from the
marshmallow schemas that check the requests and from the one table of
error statuses."""

import functools

from apispec import APISpec
from apispec.ext.marshmallow import MarshmallowPlugin
from marshmallow import Schema, fields

from patient import problems
from patient.problems import STATUS
from patient.schemas import (
    AppointmentRequestView,
    IdentifierField,
    ListAppointmentRequests,
    NewAppointmentRequest,
    SearchCriteria,
    SearchRequest,
    StringOrList,
)
from patient.web import FHIR_JSON

VERSION = "1.0.0"

PATIENT = {
    "type": "object",
    "description": "An HL7 FHIR R4 Patient resource, checked against R4 in full"
    " (https://hl7.org/fhir/R4/patient.html).",
    "required": ["resourceType"],
    "properties": {
        "resourceType": {"const": "Patient"},
        "id": {"type": "string"},
        "meta": {
            "type": "object",
            "properties": {
                "versionId": {"type": "string"},
                "lastUpdated": {"type": "string"},
            },
        },
    },
}


class Problem(Schema):
    """RFC 9457 problem details."""

    type = fields.String(required=True)
    title = fields.String(required=True)
    status = fields.Integer(required=True)
    detail = fields.String(required=True)
    code = fields.String(required=True)
    errors = fields.Dict(
        keys=fields.String(),
        values=fields.List(fields.String()),
        metadata={"description": "per field, what is wrong (validation only)"},
    )
    existing_id = fields.String(
        metadata={"description": "the patient holding the identifier"}
    )
    current_version = fields.String()
    reference = fields.String(
        metadata={"description": "finds the error in the service's log"}
    )


class Check(Schema):
    status = fields.String(required=True)
    latency_ms = fields.Float()
    error = fields.String()


class QueueCheck(Schema):
    status = fields.String(required=True, metadata={"enum": ["up", "degraded"]})
    circuit = fields.String(required=True)
    owed = fields.Integer(metadata={"description": "calls the outbox still owes"})
    failing = fields.Integer(
        metadata={"description": "calls owed that failed at least once"}
    )
    oldest_s = fields.Float()
    backlog_error = fields.String()


class Health(Schema):
    status = fields.String(required=True, metadata={"enum": ["ok", "down"]})
    database = fields.Nested(Check, required=True)
    broker = fields.Nested(Check, required=True)
    queue_service = fields.Nested(
        QueueCheck,
        required=True,
        metadata={"description": "degraded, never down: requests wait"},
    )


def _page(name, component):
    return {
        "type": "object",
        "required": [name, "next"],
        "properties": {
            name: {
                "type": "array",
                "items": {"$ref": f"#/components/schemas/{component}"},
            },
            "next": {
                "type": ["string", "null"],
                "description": "the next page (also in the Link header), null"
                " on the last",
            },
        },
    }


PATIENT_ID = {
    "in": "path",
    "name": "patient_id",
    "required": True,
    "schema": {"type": "string"},
}
REQUEST_ID = {**PATIENT_ID, "name": "request_id"}
IF_MATCH = {
    "in": "header",
    "name": "If-Match",
    "schema": {"type": "string"},
    "description": 'the ETag of the version changed, W/"<version>"',
}
IDEMPOTENCY_KEY = {
    "in": "header",
    "name": "Idempotency-Key",
    "required": False,
    "schema": {"type": "string", "minLength": 1, "maxLength": 233},
    "description": "the same key and body answer as the first request did",
}
ETAG = {"schema": {"type": "string"}, "required": True}

PROTECTED = (401, 403, 500, 503)
WITH_BODY = (400, 413, 415)

# Every route: method, path, operation, what it may answer besides success.
OPERATIONS = [
    (
        "post",
        "/patients",
        {
            "operationId": "registerPatient",
            "summary": "Register a patient (clinician, admin)",
            "parameters": [IDEMPOTENCY_KEY],
            "requestBody": "patient",
            "responses": {201: "patient-created"},
        },
        (*PROTECTED, *WITH_BODY, 409),
    ),
    (
        "get",
        "/patients",
        {
            "operationId": "searchPatients",
            "summary": "Search patients; a patient finds only their own record",
            "parameters": [
                {"in": "query", "schema": SearchCriteria},
                {"in": "query", "schema": SearchRequest(only=("count", "cursor"))},
            ],
            "responses": {200: "search-page"},
        },
        (*PROTECTED, 400),
    ),
    (
        "get",
        "/patients/{patient_id}",
        {
            "operationId": "getPatient",
            "summary": "Read a patient (a patient: their own record only)",
            "parameters": [PATIENT_ID],
            "responses": {200: "patient"},
        },
        (*PROTECTED, 404),
    ),
    (
        "put",
        "/patients/{patient_id}",
        {
            "operationId": "updatePatient",
            "summary": "Replace a patient at the version named by If-Match",
            "parameters": [PATIENT_ID, {**IF_MATCH, "required": True}],
            "requestBody": "patient",
            "responses": {200: "patient"},
        },
        (*PROTECTED, *WITH_BODY, 404, 409, 412, 428),
    ),
    (
        "post",
        "/patients/{patient_id}/deactivate",
        {
            "operationId": "deactivatePatient",
            "summary": "Mark a patient inactive (admin)",
            "parameters": [PATIENT_ID, IF_MATCH],
            "responses": {200: "patient"},
        },
        (*PROTECTED, 400, 404, 412),
    ),
    (
        "post",
        "/patients/{patient_id}/appointment-requests",
        {
            "operationId": "requestAppointment",
            "summary": "Ask for an appointment; it is forwarded to the Queue"
            " Service at once or, if that is down, as soon as it is back",
            "parameters": [PATIENT_ID, IDEMPOTENCY_KEY],
            "requestBody": "NewAppointmentRequest",
            "responses": {202: "appointment-accepted"},
        },
        (*PROTECTED, *WITH_BODY, 404, 409),
    ),
    (
        "get",
        "/patients/{patient_id}/appointment-requests",
        {
            "operationId": "listAppointmentRequests",
            "summary": "A patient's appointment requests, newest first",
            "parameters": [
                PATIENT_ID,
                {"in": "query", "schema": ListAppointmentRequests},
            ],
            "responses": {200: "appointment-page"},
        },
        (*PROTECTED, 400, 404),
    ),
    (
        "get",
        "/appointment-requests/{request_id}",
        {
            "operationId": "getAppointmentRequest",
            "summary": "An appointment request, with its ticket once queued",
            "parameters": [REQUEST_ID],
            "responses": {200: "appointment"},
        },
        (*PROTECTED, 404),
    ),
    (
        "post",
        "/appointment-requests/{request_id}/cancel",
        {
            "operationId": "cancelAppointmentRequest",
            "summary": "Cancel an appointment request, at the Queue Service too",
            "parameters": [REQUEST_ID],
            "responses": {200: "appointment"},
        },
        (*PROTECTED, 404, 409),
    ),
    (
        "get",
        "/health",
        {
            "operationId": "health",
            "summary": "Liveness and readiness: the database and the broker",
            "security": [],
            "responses": {200: "health", 503: "health"},
        },
        (500,),
    ),
    (
        "get",
        "/openapi.json",
        {
            "operationId": "openapi",
            "summary": "This document",
            "security": [],
            "responses": {200: "openapi"},
        },
        (500,),
    ),
]


def _success(kind):
    if kind == "patient":
        return {
            "description": "the patient",
            "headers": {"ETag": ETAG},
            "content": {"application/json": {"schema": "Patient"}},
        }
    if kind == "patient-created":
        return {
            "description": "registered, or the first answer to this key",
            "headers": {"ETag": ETAG, "Location": ETAG},
            "content": {"application/json": {"schema": "Patient"}},
        }
    if kind == "search-page":
        return {
            "description": "a page of patients, in a stable order",
            "content": {"application/json": {"schema": "SearchPage"}},
        }
    if kind == "appointment-accepted":
        return {
            "description": "taken: pending, or forwarded already; or the first"
            " answer to this key",
            "headers": {"Location": ETAG},
            "content": {"application/json": {"schema": "AppointmentRequest"}},
        }
    if kind == "appointment":
        return {
            "description": "the appointment request",
            "content": {"application/json": {"schema": "AppointmentRequest"}},
        }
    if kind == "appointment-page":
        return {
            "description": "a page of appointment requests",
            "content": {"application/json": {"schema": "AppointmentRequestPage"}},
        }
    if kind == "health":
        return {
            "description": "ok (200) or down (503)",
            "content": {"application/json": {"schema": Health}},
        }
    return {"description": "OpenAPI 3.1", "content": {"application/json": {}}}


def _problem_response(status):
    titles = sorted({title for s, title in STATUS.values() if s == status})
    return {
        "description": " or ".join(titles),
        "content": {problems.PROBLEM_JSON: {"schema": Problem}},
    }


def _search_field(converter, field, **kwargs):
    """Search parameters: a list means all values must match."""
    if isinstance(field, StringOrList):
        return {
            "type": "array",
            "items": converter.field2property(field.inner),
            "minItems": 1,
            "maxItems": field.max_items,
        }
    if isinstance(field, IdentifierField):
        return {"type": "string", "minLength": 1, "maxLength": 500}
    return {}


@functools.cache
def document():
    plugin = MarshmallowPlugin()
    spec = APISpec(
        title="Patient Service",
        version=VERSION,
        openapi_version="3.1.0",
        plugins=[plugin],
        info={
            "description": "Patient records (HL7 FHIR R4 Patient). Every error"
            " is RFC 9457 problem details with a stable `code`; a method a"
            " path does not have answers 405 with `Allow`."
        },
        security=[{"bearer": []}],
    )
    plugin.converter.add_attribute_function(
        lambda self, field, **kw: _search_field(self, field, **kw)
    )
    spec.components.security_scheme(
        "bearer", {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
    )
    spec.components.schema("Patient", PATIENT)
    spec.components.schema("SearchPage", _page("patients", "Patient"))
    spec.components.schema("AppointmentRequest", schema=AppointmentRequestView)
    spec.components.schema(
        "AppointmentRequestPage", _page("appointment_requests", "AppointmentRequest")
    )
    spec.components.response("MethodNotAllowed", _problem_response(405))

    for method, path, operation, errors in OPERATIONS:
        operation = dict(operation)
        responses = {
            str(status): _success(kind)
            for status, kind in operation.pop("responses").items()
        }
        for status in errors:
            responses[str(status)] = _problem_response(status)
        body = operation.pop("requestBody", None)
        if body == "patient":
            operation["requestBody"] = {
                "required": True,
                "content": {media: {"schema": "Patient"} for media in FHIR_JSON},
            }
        elif body is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": NewAppointmentRequest}},
            }
        spec.path(path=path, operations={method: {**operation, "responses": responses}})
    return spec.to_dict()
