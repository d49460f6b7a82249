"""The HTTP API: one thin method per route, calling the same functions as
the RPC methods. ``PatientService`` inherits these routes."""

import functools
import hashlib
import re
from urllib.parse import urlencode

from patient import appointments, auth, idempotency, openapi, records, search
from patient.errors import AppointmentRequestNotFound, InvalidRequest
from patient.problems import PreconditionRequired, etag
from patient.web import FHIR_JSON, JSON, json_response, route

_ENTITY_TAG = re.compile(r'\s*(?:W/)?"([^"]*)"\s*')
_COUNT = re.compile(r"[0-9]{1,9}")
PAGE_PARAMETERS = ("count", "cursor")


class PatientApi:
    @route("POST", "/patients", action="register", body=FHIR_JSON)
    def http_register_patient(self, request, user, body):
        key = _scoped_key(user, request.headers.get("Idempotency-Key"))
        stored = records.register_patient(
            self.db.session, body, self.caller, key, self.region
        )
        return _patient_response(stored, 201, location=True)

    @route("GET", "/patients/<patient_id>", action="read")
    def http_get_patient(self, request, user, patient_id):
        auth.check_own_record(user, patient_id)
        return _patient_response(records.get_patient(self.db.session, patient_id))

    @route("PUT", "/patients/<patient_id>", action="update", body=FHIR_JSON)
    def http_update_patient(self, request, user, body, patient_id):
        auth.check_own_record(user, patient_id)
        version = _if_match(request)
        if version is None:
            raise PreconditionRequired()
        stored = records.update_patient(
            self.db.session,
            patient_id,
            body,
            version,
            self.caller,
            self.region,
            check=functools.partial(auth.check_update, user),
        )
        return _patient_response(stored)

    @route("POST", "/patients/<patient_id>/deactivate", action="deactivate")
    def http_deactivate_patient(self, request, user, patient_id):
        stored = records.deactivate_patient(
            self.db.session, patient_id, self.caller, _if_match(request), self.region
        )
        return _patient_response(stored)

    @route("GET", "/patients", action="search")
    def http_search_patients(self, request, user):
        criteria = {
            name: values[0] if len(values) == 1 else values
            for name, values in request.args.lists()
            if name not in PAGE_PARAMETERS
        }
        count, cursor = request.args.get("count", 20), request.args.get("cursor")
        page = search.search_patients(
            self.db.session,
            auth.restrict_search(user, criteria),
            _count(count),
            cursor,
            self.region,
            encoded=True,
        )
        return _page_response(request, "patients", page)

    @route(
        "POST",
        "/patients/<patient_id>/appointment-requests",
        action="request-appointment",
        body=JSON,
    )
    def http_request_appointment(self, request, user, body, patient_id):
        auth.check_own_record(user, patient_id)
        key = _scoped_key(user, request.headers.get("Idempotency-Key"))
        made = appointments.request_appointment(
            self.db.session, patient_id, body, self.caller, key
        )
        made = self.forward_new_request(made)
        location = f"/appointment-requests/{made['request_id']}"
        return json_response(made, 202, {"Location": location})

    @route(
        "GET",
        "/patients/<patient_id>/appointment-requests",
        action="read-appointments",
    )
    def http_list_appointment_requests(self, request, user, patient_id):
        auth.check_own_record(user, patient_id)
        page = appointments.list_appointment_requests(
            self.db.session,
            patient_id,
            request.args.get("status"),
            _count(request.args.get("count", 20)),
            request.args.get("cursor"),
        )
        return _page_response(request, "appointment_requests", page)

    @route("GET", "/appointment-requests/<request_id>", action="read-appointments")
    def http_get_appointment_request(self, request, user, request_id):
        found = self._own_appointment_request(user, request_id)
        return json_response(found)

    @route(
        "POST",
        "/appointment-requests/<request_id>/cancel",
        action="cancel-appointment",
    )
    def http_cancel_appointment_request(self, request, user, request_id):
        self._own_appointment_request(user, request_id)
        cancelled = appointments.cancel_appointment_request(
            self.db.session, request_id, self.caller
        )
        return json_response(cancelled)

    def _own_appointment_request(self, user, request_id):
        found = appointments.get_appointment_request(self.db.session, request_id)
        auth.check_own_record(
            user, found["patient_id"], missing=AppointmentRequestNotFound
        )
        return found

    @route("GET", "/health")
    def http_health(self, request):
        report = self.health_report()
        checked = request.tokens_checked
        report["authentication"] = {"status": "up" if checked else "down"}
        if not checked:
            report["status"] = "down"
        return json_response(report, 200 if report["status"] == "ok" else 503)

    @route("GET", "/openapi.json")
    def http_openapi(self, request):
        return json_response(openapi.document())


def _patient_response(stored, status=200, location=False):
    headers = {"ETag": etag(stored["meta"]["versionId"])}
    if location:
        headers["Location"] = f"/patients/{stored['id']}"
    return json_response(stored, status, headers)


def _count(count):
    """A page size from the query string; anything but digits is left for
    the core to refuse."""
    return int(count) if _COUNT.fullmatch(str(count)) else count


def _page_response(request, name, page):
    following = _next_link(request, page["next_cursor"])
    headers = {"Link": f'<{following}>; rel="next"'} if following else None
    return json_response({name: page[name], "next": following}, headers=headers)


def _if_match(request):
    """The version named by If-Match (``W/"3"`` or ``"3"``), or None."""
    value = request.headers.get("If-Match")
    if value is None:
        return None
    match = _ENTITY_TAG.fullmatch(value)
    if match is None or not _COUNT.fullmatch(match.group(1)):
        raise InvalidRequest({"If-Match": ['must be one entity tag, W/"<version>"']})
    return match.group(1)


def _scoped_key(user, key):
    """Idempotency keys are the caller's own: another caller's key of the
    same text is another key."""
    if not key:
        return key
    owner = hashlib.sha256(user.subject.encode()).hexdigest()[:16]
    scoped = f"http:{owner}:{key}"
    if len(scoped) > idempotency.MAX_KEY_CHARS:
        room = idempotency.MAX_KEY_CHARS - len(scoped) + len(key)
        raise InvalidRequest({"Idempotency-Key": [f"must be 1 to {room} characters"]})
    return scoped


def _next_link(request, next_cursor):
    if next_cursor is None:
        return None
    kept = [(k, v) for k, v in request.args.items(multi=True) if k != "cursor"]
    return f"{request.path}?{urlencode([*kept, ('cursor', next_cursor)])}"
