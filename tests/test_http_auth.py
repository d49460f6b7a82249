"""Who may do what over HTTP: bearer tokens checked against the configured
key, each role against each route, and a patient kept to their own record."""

import base64
import hashlib
import hmac
import json
import time
import uuid

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from nameko.containers import ServiceContainer

from patient.auth import TokenVerifier, issue_token
from patient.problems import AuthNotConfigured, Unauthenticated
from patient.service import PatientService
from tests.factories import patient
from tests.http_client import TOKEN_SETTINGS, ApiClient, free_port, token
from tests.test_appointments import video_visit
from tests.test_http import CLINICIAN, assert_problem, register, registered_patient


@pytest.fixture
def alice(api):
    return registered_patient(api, "alice")


@pytest.fixture
def bob(api):
    stored = register(api).json()
    made = api.post(
        f"/patients/{stored['id']}/appointment-requests",
        as_=CLINICIAN,
        json=video_visit(),
    )
    return {**stored, "request_id": made.json()["request_id"]}


def _segment(data):
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def claims(**overrides):
    now = int(time.time())
    return {
        "sub": "mallory",
        "roles": ["admin"],
        "aud": TOKEN_SETTINGS["JWT_AUDIENCE"],
        "iss": TOKEN_SETTINGS["JWT_ISSUER"],
        "exp": now + 300,
        **overrides,
    }


def hmac_signed(secret, **overrides):
    """HS256 by hand: PyJWT refuses to sign with a key that looks public."""
    signing_input = f"{_segment({'alg': 'HS256'})}.{_segment(claims(**overrides))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


def unsigned(**overrides):
    header = _segment({"alg": "none", "typ": "JWT"})
    return f"{header}.{_segment(claims(**overrides))}."


BAD_TOKENS = {
    "expired": lambda: token("admin", ttl_s=-60),
    "forged": lambda: jwt.encode(claims(), "another-secret-" + "x" * 32, "HS256"),
    "alg-none": lambda: unsigned(),
    "alg-none-uppercase": lambda: unsigned().replace(
        _segment({"alg": "none", "typ": "JWT"}), _segment({"alg": "NONE"})
    ),
    "other-audience": lambda: token("admin", JWT_AUDIENCE="billing"),
    "other-issuer": lambda: token("admin", JWT_ISSUER="someone-else"),
    "no-expiry": lambda: jwt.encode(
        {k: v for k, v in claims().items() if k != "exp"},
        TOKEN_SETTINGS["JWT_SECRET"],
        "HS256",
    ),
    "hs512": lambda: jwt.encode(claims(), TOKEN_SETTINGS["JWT_SECRET"], "HS512"),
    "roles-not-a-list": lambda: jwt.encode(
        claims(roles="admin"), TOKEN_SETTINGS["JWT_SECRET"], "HS256"
    ),
    "patient-without-patient-id": lambda: token("patient"),
    "garbage": lambda: "not.a.token",
}


@pytest.mark.parametrize("name", BAD_TOKENS)
def test_a_bad_token_is_401(api, name):
    response = api.get("/patients", as_=BAD_TOKENS[name]())

    assert_problem(response, 401, "unauthenticated")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "authorization", [None, "", "Bearer", "Basic dXNlcjpwYXNz", "Bearer " + "a" * 5000]
)
def test_a_missing_or_malformed_authorization_is_401(api, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}

    response = api.get("/patients", headers=headers)

    assert_problem(response, 401, "unauthenticated")


def test_an_unauthenticated_write_is_refused_before_its_body_is_read(api):
    response = api.post(
        "/patients", data=b"x" * (2 * 1024 * 1024), headers={"Content-Type": "x/y"}
    )

    assert_problem(response, 401, "unauthenticated")


# Each role against each route: the status when the record is someone
# else's (patients) or any record (staff).
ROUTES = {
    "register": ("POST", "/patients", True),
    "search": ("GET", "/patients", False),
    "read": ("GET", "/patients/{id}", False),
    "update": ("PUT", "/patients/{id}", True),
    "deactivate": ("POST", "/patients/{id}/deactivate", False),
    "request-appointment": ("POST", "/patients/{id}/appointment-requests", True),
    "list-appointments": ("GET", "/patients/{id}/appointment-requests", False),
    "read-appointment": ("GET", "/appointment-requests/{request_id}", False),
    "cancel-appointment": ("POST", "/appointment-requests/{request_id}/cancel", False),
}
APPOINTMENTS = {
    "request-appointment": 202,
    "list-appointments": 200,
    "read-appointment": 200,
    "cancel-appointment": 200,
}
EXPECTED = {
    "patient": {
        "register": 403,
        "search": 200,
        "read": 404,
        "update": 404,
        "deactivate": 403,
        **{route: 404 for route in APPOINTMENTS},
    },
    "clinician": {
        "register": 201,
        "search": 200,
        "read": 200,
        "update": 200,
        "deactivate": 403,
        **APPOINTMENTS,
    },
    "admin": {
        "register": 201,
        "search": 200,
        "read": 200,
        "update": 200,
        "deactivate": 200,
        **APPOINTMENTS,
    },
    "none": {route: 403 for route in ROUTES},
}


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("role", EXPECTED)
def test_each_role_against_each_route(api, alice, bob, role, route):
    _, alices_token = alice
    credentials = {
        "patient": alices_token,
        "clinician": CLINICIAN,
        "admin": token("admin"),
        "none": token("receptionist"),
    }[role]
    method, path, with_body = ROUTES[route]
    body = {
        "update": {**bob, "gender": "other"},
        "request-appointment": video_visit(),
    }.get(route, patient())
    resource = {k: v for k, v in body.items() if k != "request_id"}

    response = api.request(
        method,
        path.format(id=bob["id"], request_id=bob["request_id"]),
        as_=credentials,
        json=resource if with_body else None,
        headers={"If-Match": 'W/"1"'} if route == "update" else None,
    )

    assert response.status_code == EXPECTED[role][route], response.text


def test_a_patient_reads_and_updates_their_own_record(api, alice, db):
    stored, alices_token = alice
    path = f"/patients/{stored['id']}"

    assert api.get(path, as_=alices_token).json() == stored
    response = api.put(
        path,
        as_=alices_token,
        json={**stored, "gender": "other"},
        headers={"If-Match": 'W/"1"'},
    )

    assert response.status_code == 200


def test_another_patients_record_answers_as_if_it_did_not_exist(api, alice, bob):
    _, alices_token = alice

    theirs = api.get(f"/patients/{bob['id']}", as_=alices_token)
    nobodys = api.get(f"/patients/{uuid.uuid4()}", as_=alices_token)

    assert theirs.status_code == nobodys.status_code == 404
    assert theirs.json() == nobodys.json()


def test_a_patient_search_finds_only_their_own_record(api, alice, bob):
    stored, alices_token = alice

    everyone = api.get("/patients?family=testperson", as_=alices_token)
    by_id = api.get(f"/patients?_id={bob['id']}", as_=alices_token)

    assert [p["id"] for p in everyone.json()["patients"]] == [stored["id"]]
    assert by_id.json() == {"patients": [], "next": None}


def test_a_patient_never_learns_who_holds_an_identifier(api, alice, bob):
    stored, alices_token = alice

    response = api.put(
        f"/patients/{stored['id']}",
        as_=alices_token,
        json={**stored, "identifier": bob["identifier"]},
        headers={"If-Match": 'W/"1"'},
    )

    body = assert_problem(response, 409, "duplicate-patient")
    assert "existing_id" not in body
    assert bob["id"] not in response.text


def test_health_and_the_document_need_no_token(api):
    assert api.get("/health").status_code == 200
    assert api.get("/openapi.json").status_code == 200


def _verifier(**settings):
    return TokenVerifier({**TOKEN_SETTINGS, **settings})


@pytest.mark.parametrize(
    "settings",
    [
        {"JWT_SECRET": ""},
        {"JWT_SECRET": "too-short"},
        {"JWT_ALGORITHM": "none"},
        {"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": ""},
        {"JWT_ALGORITHM": "RS256", "JWT_PUBLIC_KEY": "/no/such/key.pem"},
    ],
    ids=["no-secret", "short-secret", "alg-none", "no-public-key", "missing-file"],
)
def test_without_a_usable_key_no_token_is_accepted(settings):
    verifier = _verifier(**settings)

    for credentials in (token("admin"), unsigned()):
        with pytest.raises(AuthNotConfigured):
            verifier.principal(f"Bearer {credentials}")


def test_a_clock_a_little_ahead_or_behind_is_tolerated():
    now = int(time.time())
    secret = TOKEN_SETTINGS["JWT_SECRET"]
    ahead = jwt.encode(claims(iat=now + 10, nbf=now + 10), secret, "HS256")
    behind = jwt.encode(claims(exp=now - 10), secret, "HS256")

    for credentials in (ahead, behind):
        assert _verifier().principal(f"Bearer {credentials}").subject == "mallory"


@pytest.fixture(scope="module")
def rsa_keys(tmp_path_factory):
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    path = tmp_path_factory.mktemp("keys") / "public.pem"
    path.write_bytes(public_pem)
    return private, public_pem.decode(), path


def test_rs256_tokens_are_checked_with_the_public_key(rsa_keys):
    private, public_pem, path = rsa_keys
    settings = {"JWT_ALGORITHM": "RS256"}
    good = issue_token(private, "svc", ["clinician"], config=settings)

    for key in (public_pem, str(path)):
        verifier = _verifier(JWT_PUBLIC_KEY=key, **settings)
        assert verifier.principal(f"Bearer {good}").subject == "svc"
        # The classic confusion: the public key used as an HMAC secret.
        for forged in (hmac_signed(public_pem.encode()), unsigned()):
            with pytest.raises(Unauthenticated):
                verifier.principal(f"Bearer {forged}")


@pytest.fixture
def unconfigured_api(config, clean_db):
    class UnconfiguredService(PatientService):
        name = "patient_service_without_key"

    address = f"127.0.0.1:{free_port()}"
    container = ServiceContainer(
        UnconfiguredService,
        {
            **config,
            "DB_URIS": {
                "patient_service_without_key:Base": config["DB_URIS"][
                    "patient_service:Base"
                ]
            },
            "WEB_SERVER_ADDRESS": address,
            "JWT_SECRET": None,
        },
    )
    container.start()
    with ApiClient(f"http://{address}") as client:
        yield client
    container.stop()


def test_a_service_without_a_key_answers_503_and_stays_healthy(unconfigured_api):
    response = unconfigured_api.get("/patients", as_=unsigned())

    assert_problem(response, 503, "authentication-unavailable")
    assert unconfigured_api.get("/health").status_code == 200
