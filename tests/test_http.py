"""The HTTP API through real HTTP on the running service: each route, its
headers, and every error status as problem details."""

import json
import logging
import re
import uuid

import pytest
from nameko.cli.run import import_service
from nameko.containers import ServiceContainer
from sqlalchemy import select

from patient import records
from patient.errors import EXPECTED_ERRORS, InternalError
from patient.models import AuditEvent
from patient.problems import STATUS
from patient.service import PatientService
from patient.web import PatientHttp
from tests.factories import patient
from tests.http_client import token

CLINICIAN = token("clinician", sub="dr-who")
ADMIN = token("admin", sub="admin-1")
PROBLEM = "application/problem+json"


def register(api, resource=None, as_=CLINICIAN, **kwargs):
    return api.post("/patients", as_=as_, json=resource or patient(), **kwargs)


def registered_patient(api, sub):
    """A patient registered by a clinician, and a token for that patient."""
    stored = register(api).json()
    return stored, token("patient", sub=sub, patient_id=stored["id"])


def assert_problem(response, status, code):
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"] == PROBLEM
    body = response.json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"].endswith(code)
    assert body["title"] and body["detail"]
    return body


def test_registering_answers_201_with_location_and_etag(api):
    response = register(api)

    assert response.status_code == 201
    stored = response.json()
    assert response.headers["Location"] == f"/patients/{stored['id']}"
    assert response.headers["ETag"] == 'W/"1"'
    assert api.get(response.headers["Location"], as_=CLINICIAN).json() == stored


def test_a_fhir_json_body_is_accepted(api):
    response = api.post(
        "/patients",
        as_=CLINICIAN,
        data=json.dumps(patient()),
        headers={"Content-Type": "application/fhir+json; charset=utf-8"},
    )

    assert response.status_code == 201


def test_a_retried_registration_with_its_key_returns_the_first_answer(api):
    resource = patient()
    first = register(api, resource, headers={"Idempotency-Key": "intake/1"})
    again = register(api, resource, headers={"Idempotency-Key": "intake/1"})

    assert again.status_code == 201
    assert again.json() == first.json()


def test_a_key_reused_for_another_patient_is_a_conflict(api):
    register(api, headers={"Idempotency-Key": "intake/2"})
    response = register(api, headers={"Idempotency-Key": "intake/2"})

    assert_problem(response, 409, "idempotency-key-reused")


def test_idempotency_keys_belong_to_the_caller(api):
    resource = patient()
    first = register(api, resource, headers={"Idempotency-Key": "k"})
    other = register(api, resource, as_=ADMIN, headers={"Idempotency-Key": "k"})

    # Another caller's key of the same text is a new key: the identifier
    # is then held already.
    body = assert_problem(other, 409, "duplicate-patient")
    assert body["existing_id"] == first.json()["id"]


def test_reading_answers_the_resource_with_its_version_as_etag(api):
    stored = register(api).json()

    response = api.get(f"/patients/{stored['id']}", as_=CLINICIAN)

    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"1"'
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == stored


@pytest.mark.parametrize("patient_id", [str(uuid.uuid4()), "not-an-id"])
def test_an_unknown_patient_is_404(api, patient_id):
    response = api.get(f"/patients/{patient_id}", as_=CLINICIAN)

    assert_problem(response, 404, "patient-not-found")


def test_an_update_with_the_current_etag_answers_the_new_version(api):
    stored = register(api).json()
    stored["gender"] = "other"

    response = api.put(
        f"/patients/{stored['id']}",
        as_=CLINICIAN,
        json=stored,
        headers={"If-Match": 'W/"1"'},
    )

    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"2"'
    assert response.json()["gender"] == "other"


def test_an_update_without_if_match_is_428(api):
    stored = register(api).json()

    response = api.put(f"/patients/{stored['id']}", as_=CLINICIAN, json=stored)

    assert_problem(response, 428, "precondition-required")
    assert api.get(f"/patients/{stored['id']}", as_=CLINICIAN).json() == stored


def test_an_update_at_a_stale_version_is_412_naming_the_current_one(api):
    stored = register(api).json()
    path = f"/patients/{stored['id']}"
    api.put(path, as_=CLINICIAN, json=stored, headers={"If-Match": 'W/"1"'})

    response = api.put(path, as_=CLINICIAN, json=stored, headers={"If-Match": '"1"'})

    body = assert_problem(response, 412, "version-conflict")
    assert body["current_version"] == "2"
    assert response.headers["ETag"] == 'W/"2"'


def test_a_malformed_if_match_is_400(api):
    stored = register(api).json()

    response = api.put(
        f"/patients/{stored['id']}",
        as_=CLINICIAN,
        json=stored,
        headers={"If-Match": "W/1, W/2"},
    )

    body = assert_problem(response, 400, "invalid-request")
    assert list(body["errors"]) == ["If-Match"]


def test_an_invalid_patient_is_400_with_errors_per_field(api):
    response = register(api, patient(gender="robot", active="yes"))

    body = assert_problem(response, 400, "invalid-patient")
    assert set(body["errors"]) == {"gender", "active"}


def test_a_duplicate_identifier_is_409_naming_the_holder(api):
    first = register(api, patient()).json()

    response = register(api, patient(identifier=first["identifier"]))

    body = assert_problem(response, 409, "duplicate-patient")
    assert body["existing_id"] == first["id"]


def test_an_admin_deactivates_a_patient(api):
    stored = register(api).json()

    response = api.post(f"/patients/{stored['id']}/deactivate", as_=ADMIN)

    assert response.status_code == 200
    assert response.json()["active"] is False
    assert response.headers["ETag"] == 'W/"2"'


def test_deactivating_at_a_stale_version_is_412(api):
    stored = register(api).json()
    path = f"/patients/{stored['id']}"
    api.put(path, as_=CLINICIAN, json=stored, headers={"If-Match": 'W/"1"'})

    response = api.post(f"{path}/deactivate", as_=ADMIN, headers={"If-Match": 'W/"1"'})

    assert_problem(response, 412, "version-conflict")


def test_the_token_subject_is_the_audit_actor(api, db):
    stored = register(api).json()

    event = db.execute(select(AuditEvent)).scalar_one()
    assert (event.actor, event.service) == ("dr-who", "gateway")
    assert str(event.patient_id) == stored["id"]


def test_search_pages_follow_the_next_link(api):
    ids = sorted(
        register(api, patient(name=[{"family": "Pagewalker"}])).json()["id"]
        for _ in "abc"
    )

    first = api.get("/patients?family=pagewalk&count=2", as_=CLINICIAN)
    assert first.status_code == 200
    following = first.json()["next"]
    assert first.headers["Link"] == f'<{following}>; rel="next"'
    second = api.get(following, as_=CLINICIAN)

    found = [p["id"] for p in first.json()["patients"] + second.json()["patients"]]
    assert found == ids
    assert second.json()["next"] is None


def test_search_criteria_repeated_must_all_match(api):
    register(api, patient(name=[{"family": "Both", "given": ["Mary", "Ann"]}]))
    register(api, patient(name=[{"family": "Both", "given": ["Mary"]}]))

    response = api.get("/patients?given=mary&given=ann", as_=CLINICIAN)

    assert [p["name"][0]["given"] for p in response.json()["patients"]] == [
        ["Mary", "Ann"]
    ]


@pytest.mark.parametrize(
    "query", ["unknown=1", "count=0", "count=many", "cursor=junk", "gender=robot"]
)
def test_a_bad_search_is_400_naming_the_parameter(api, query):
    response = api.get(f"/patients?{query}", as_=CLINICIAN)

    body = assert_problem(response, 400, "invalid-search")
    assert list(body["errors"]) == [query.split("=")[0]]


def test_health_needs_no_token_and_reports_each_dependency(api):
    response = api.get("/health")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert {body["database"]["status"], body["broker"]["status"]} == {"up"}


def test_an_unknown_route_is_404_problem(api):
    assert_problem(api.get("/nothing-here"), 404, "not-found")


def test_a_wrong_method_is_405_with_allow(api):
    response = api.request("DELETE", f"/patients/{uuid.uuid4()}", as_=CLINICIAN)

    assert_problem(response, 405, "method-not-allowed")
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "PUT"}


def test_a_body_over_the_limit_is_413_by_its_length(api):
    response = api.post(
        "/patients",
        as_=CLINICIAN,
        data=b"{" + b" " * (1024 * 1024) + b"}",
        headers={"Content-Type": "application/json"},
    )

    assert_problem(response, 413, "payload-too-large")


def test_a_chunked_body_over_the_limit_is_413_read_no_further(api):
    def chunks():
        yield b'{"resourceType": "Patient", "x": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}'

    response = api.post(
        "/patients",
        as_=CLINICIAN,
        data=chunks(),
        headers={"Content-Type": "application/json"},
    )

    assert_problem(response, 413, "payload-too-large")


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/xml", "application/json; charset=latin-1"],
)
def test_a_body_not_in_json_is_415(api, content_type):
    response = api.post(
        "/patients",
        as_=CLINICIAN,
        data=json.dumps(patient()),
        headers={"Content-Type": content_type},
    )

    assert_problem(response, 415, "unsupported-media-type")


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType": "Patient", "gender": "male", "gender": "female"}',
        b'{"resourceType": "Patient",',
        b'{"resourceType": "Patient", "x": NaN}',
        b"\xff\xfe",
        b"[" * 100_000 + b"]" * 100_000,
    ],
    ids=["duplicate-key", "truncated", "nan", "not-utf8", "deep"],
)
def test_a_body_that_is_not_plain_json_is_400(api, body):
    response = api.post(
        "/patients",
        as_=CLINICIAN,
        data=body,
        headers={"Content-Type": "application/json"},
    )

    body = assert_problem(response, 400, "invalid-request")
    assert list(body["errors"]) == ["body"]


def test_an_unexpected_error_is_a_500_problem_whose_reference_is_logged(
    api, monkeypatch, caplog
):
    text = "Chalmers 1974-12-25"

    def broken(session, patient_id):  # stands in for a bug
        raise RuntimeError(text)

    monkeypatch.setattr(records, "get_patient", broken)
    caplog.set_level(logging.INFO)

    response = api.get(f"/patients/{uuid.uuid4()}", as_=CLINICIAN)

    body = assert_problem(response, 500, "internal-error")
    assert "Chalmers" not in response.text
    assert "Traceback" not in response.text
    assert body["reference"] in caplog.text
    assert "Chalmers" not in caplog.text


def test_the_document_describes_every_route_the_server_has(api, running_service):
    document = api.get("/openapi.json").json()
    served = {
        (method.lower(), re.sub(r"<(\w+)>", r"{\1}", entrypoint.url))
        for entrypoint in running_service.entrypoints
        if isinstance(entrypoint, PatientHttp)
        for method in entrypoint.method.split(",")
    }

    documented = {
        (method, path)
        for path, operations in document["paths"].items()
        for method in operations
    }
    assert document["openapi"] == "3.1.0"
    assert served == documented
    assert document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


def test_the_document_names_every_error_status_an_operation_can_answer(api):
    operations = api.get("/openapi.json").json()["paths"]

    update = operations["/patients/{patient_id}"]["put"]["responses"]
    assert set(update) == {
        "200", "400", "401", "403", "404", "409", "412", "413", "415", "428",
        "500", "503",
    }  # fmt: skip
    assert set(operations["/health"]["get"]["security"]) == set()


def test_a_chunked_body_within_the_limit_is_read_whole(api):
    body = json.dumps(patient()).encode()

    response = api.post(
        "/patients",
        as_=CLINICIAN,
        data=iter([body[:10], body[10:]]),
        headers={"Content-Type": "application/json"},
    )

    assert response.status_code == 201


def test_head_answers_as_get_without_a_body(api):
    stored = register(api).json()

    response = api.request("HEAD", f"/patients/{stored['id']}", as_=CLINICIAN)

    assert response.status_code == 200
    assert response.headers["ETag"] == 'W/"1"'
    assert response.content == b""


def test_a_second_service_on_the_same_port_fails_to_start(config, running_service):
    class SecondService(PatientService):
        name = "patient_service_second"

    uris = {"patient_service_second:Base": config["DB_URIS"]["patient_service:Base"]}
    container = ServiceContainer(SecondService, {**config, "DB_URIS": uris})

    with pytest.raises(OSError):
        container.start()
    container.kill()


def test_nameko_run_finds_the_one_service_in_its_module():
    assert import_service("patient.service") == [PatientService]


def test_every_error_a_caller_can_get_has_one_http_status():
    service_errors = {*EXPECTED_ERRORS, InternalError}

    assert service_errors <= set(STATUS)
    assert all(400 <= status < 600 for status, _ in STATUS.values())
    codes = [error.code for error in STATUS]
    assert len(codes) == len(set(codes)), "codes are stable and distinct"
