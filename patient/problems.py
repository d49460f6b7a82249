"""HTTP answers for errors: the one table from an error type to a status,
and RFC 9457 problem details (``application/problem+json``) bodies.

The service's own errors live in ``patient.errors``; the ones here exist
only over HTTP (authentication, content negotiation, preconditions).
"""

import json

from werkzeug.wrappers import Response

from patient.errors import (
    AppointmentNotCancellable,
    AppointmentRequestNotFound,
    DuplicatePatient,
    IdempotencyKeyReused,
    InternalError,
    InvalidAppointmentRequest,
    InvalidFields,
    InvalidPatient,
    InvalidRequest,
    InvalidSearch,
    PatientInactive,
    PatientNotFound,
    PatientServiceError,
    ServiceUnavailable,
    VersionConflict,
)

PROBLEM_JSON = "application/problem+json"
TYPE_PREFIX = "urn:patient-service:problem:"


class HttpProblem(PatientServiceError):
    """An error that exists only over HTTP."""


class Unauthenticated(HttpProblem):
    code = "unauthenticated"

    def __init__(self, message="a valid bearer token is required"):
        super().__init__(message)


class AuthNotConfigured(HttpProblem):
    code = "authentication-unavailable"

    def __init__(self):
        super().__init__("token verification is not configured; retry later")


class Forbidden(HttpProblem):
    code = "forbidden"

    def __init__(self, message="your role may not do this"):
        super().__init__(message)


class RouteNotFound(HttpProblem):
    code = "not-found"

    def __init__(self):
        super().__init__("no such resource")


class MethodNotAllowed(HttpProblem):
    code = "method-not-allowed"

    def __init__(self, allowed):
        super().__init__("method not allowed on this resource")
        self.allowed = sorted(allowed)


class PayloadTooLarge(HttpProblem):
    code = "payload-too-large"

    def __init__(self, limit):
        super().__init__(f"the body is over {limit} bytes")


class UnsupportedMediaType(HttpProblem):
    code = "unsupported-media-type"

    def __init__(self, accepted):
        super().__init__(f"send the body as {' or '.join(accepted)} (UTF-8)")


class PreconditionRequired(HttpProblem):
    code = "precondition-required"

    def __init__(self):
        super().__init__("send If-Match with the ETag of the version you change")


# Every error an HTTP caller can get: status and title.
STATUS = {
    InvalidPatient: (400, "Invalid patient"),
    InvalidSearch: (400, "Invalid search"),
    InvalidRequest: (400, "Invalid request"),
    InvalidAppointmentRequest: (400, "Invalid appointment request"),
    Unauthenticated: (401, "Unauthenticated"),
    Forbidden: (403, "Forbidden"),
    PatientNotFound: (404, "Not found"),
    AppointmentRequestNotFound: (404, "Not found"),
    RouteNotFound: (404, "Not found"),
    MethodNotAllowed: (405, "Method not allowed"),
    DuplicatePatient: (409, "Duplicate patient"),
    IdempotencyKeyReused: (409, "Idempotency key reused"),
    PatientInactive: (409, "Patient inactive"),
    AppointmentNotCancellable: (409, "Appointment request not cancellable"),
    VersionConflict: (412, "Precondition failed"),
    PayloadTooLarge: (413, "Payload too large"),
    UnsupportedMediaType: (415, "Unsupported media type"),
    PreconditionRequired: (428, "Precondition required"),
    InternalError: (500, "Internal error"),
    ServiceUnavailable: (503, "Service unavailable"),
    AuthNotConfigured: (503, "Service unavailable"),
}

HTTP_ERRORS = tuple(STATUS)


def problem(exc, reveal_holder=True):
    """The problem details response for ``exc``, one of ``HTTP_ERRORS``.

    ``reveal_holder`` is false for a caller who may not learn which patient
    holds an identifier.
    """
    status, title = STATUS[type(exc)]
    body = {
        "type": TYPE_PREFIX + exc.code,
        "title": title,
        "status": status,
        "detail": exc.message,
        "code": exc.code,
    }
    headers = {}
    if isinstance(exc, InvalidFields):
        body["errors"] = exc.errors
    elif isinstance(exc, PatientNotFound):
        # The same answer whether the record is missing or someone else's.
        body["detail"] = "no such patient"
    elif isinstance(exc, AppointmentRequestNotFound):
        body["detail"] = "no such appointment request"
    elif isinstance(exc, DuplicatePatient) and reveal_holder:
        body["existing_id"] = exc.existing_id
    elif isinstance(exc, DuplicatePatient):
        body["detail"] = "an identifier is already held by another patient"
    elif isinstance(exc, VersionConflict):
        body["current_version"] = exc.current_version
        headers["ETag"] = etag(exc.current_version)
    elif isinstance(exc, InternalError):
        body["reference"] = exc.reference
    elif isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allowed)
    elif isinstance(exc, Unauthenticated):
        headers["WWW-Authenticate"] = "Bearer"
    if status == 503:
        headers["Retry-After"] = "5"
    return Response(
        json.dumps(body), status=status, headers=headers, content_type=PROBLEM_JSON
    )


def etag(version):
    return f'W/"{version}"'
