"""Logs carry ids and outcomes, never what identifies a patient."""

import logging
import logging.config

import pytest
import yaml
from nameko.cli.main import setup_yaml_parser

from patient.errors import PatientServiceError
from tests.conftest import ROOT
from tests.factories import example, patient
from tests.http_client import token

SECRET_NAME = "Zyxwvutsrqponm"
SECRET_GIVEN = "Qwertyuiopasd"
SECRET_BIRTH = "1931-07-29"
SECRET_PHONE = "+44 20 7946 0958"
SECRET_EMAIL = "zyxw.secret@example.org"
SECRET_MRN = "MRN-SECRET-7781"
SECRET_REASON = "Lumps behind the left knee since spring"
SECRETS = [
    SECRET_REASON,
    SECRET_NAME,
    SECRET_NAME.lower(),
    SECRET_GIVEN,
    SECRET_BIRTH,
    "7946 0958",
    "79460958",
    SECRET_EMAIL,
    SECRET_MRN,
]


def secret_patient():
    return patient(
        name=[{"family": SECRET_NAME, "given": [SECRET_GIVEN]}],
        birthDate=SECRET_BIRTH,
        telecom=[
            {"system": "phone", "value": SECRET_PHONE},
            {"system": "email", "value": SECRET_EMAIL},
        ],
        identifier=[{"system": "urn:test:mrn", "value": SECRET_MRN}],
    )


@pytest.fixture
def shipped_logging_at_debug(monkeypatch):
    """The logging set-up of config.yml, with LOG_LEVEL=DEBUG."""
    monkeypatch.setenv("LOG_LEVEL", "DEBUG")
    setup_yaml_parser()
    config = yaml.safe_load((ROOT / "config.yml").read_text())
    logging.config.dictConfig({**config["LOGGING"], "handlers": {}, "root": {}})
    yield
    for name in config["LOGGING"]["loggers"]:
        logging.getLogger(name).setLevel(logging.NOTSET)


def test_a_full_run_at_debug_level_logs_no_personal_data(
    patients, caplog, shipped_logging_at_debug
):
    caplog.set_level(logging.DEBUG)

    stored = patients.register_patient(secret_patient(), idempotency_key="priv-1")
    patients.register_patient(secret_patient(), idempotency_key="priv-1")
    calls = [
        lambda: patients.register_patient(secret_patient()),  # duplicate
        lambda: patients.register_patient({**secret_patient(), "gender": SECRET_NAME}),
        lambda: patients.register_patient(
            {**secret_patient(), "birthDate": "x" + SECRET_BIRTH}
        ),
        lambda: patients.register_patient({**secret_patient(), SECRET_NAME: 1}),
        lambda: patients.find_patient_by_identifier("urn:test:mrn", SECRET_MRN + "x"),
        lambda: patients.search_patients(
            {"family": SECRET_NAME, "bogus": SECRET_GIVEN}
        ),
        lambda: patients.update_patient(stored["id"], secret_patient(), 7),
        lambda: patients.search_patients({"birthdate": "xx" + SECRET_BIRTH}),
    ]
    for call in calls:
        with pytest.raises(PatientServiceError):
            call()

    patients.find_patient_by_identifier("urn:test:mrn", SECRET_MRN)
    patients.search_patients({"family": SECRET_NAME[:5], "phone": SECRET_PHONE})
    patients.search_patients({"email": SECRET_EMAIL, "birthdate": SECRET_BIRTH})
    updated = patients.update_patient(stored["id"], {**stored, "gender": "other"}, 1)
    visit = {"reason": SECRET_REASON, "modality": "video"}
    made = patients.request_appointment(updated["id"], visit, "priv-visit")
    patients.list_appointment_requests(updated["id"])
    patients.cancel_appointment_request(made["request_id"])
    with pytest.raises(PatientServiceError):
        patients.request_appointment(
            updated["id"], {**visit, "modality": SECRET_REASON}
        )
    with pytest.raises(PatientServiceError):
        patients.request_appointment(updated["id"], {**visit, SECRET_REASON: 1})
    patients.deactivate_patient(updated["id"])
    patients.register_patients(
        [{"resource": example()}, {"resource": secret_patient()}]
    )

    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in caplog.records)
    assert stored["id"] in logged, "the log names the patient by id"
    for secret in SECRETS:
        assert secret not in logged
    assert "Chalmers" not in logged


def test_http_requests_at_debug_level_log_no_personal_data(
    api, caplog, shipped_logging_at_debug
):
    caplog.set_level(logging.DEBUG)
    clinician = token("clinician", sub="dr-privacy")

    stored = api.post("/patients", as_=clinician, json=secret_patient()).json()
    api.post("/patients", as_=clinician, json=secret_patient())  # duplicate
    api.post("/patients", as_=clinician, json={**secret_patient(), SECRET_NAME: 1})
    api.post(
        "/patients",
        as_=clinician,
        data=f'{{"{SECRET_NAME}": 1, "{SECRET_NAME}": 2}}',
        headers={"Content-Type": "application/json"},
    )
    for query in (
        f"family={SECRET_NAME[:6]}&birthdate={SECRET_BIRTH}",
        f"phone={SECRET_PHONE}&email={SECRET_EMAIL}",
        f"identifier=urn:test:mrn|{SECRET_MRN}",
        f"{SECRET_GIVEN}=1",
    ):
        api.get(f"/patients?{query}", as_=clinician)
    api.get(f"/patients/{SECRET_NAME}", as_=clinician)
    api.put(
        f"/patients/{stored['id']}",
        as_=clinician,
        json={**stored, "gender": "other"},
        headers={"If-Match": 'W/"1"'},
    )

    # The test's own HTTP client logs its requests whole.
    service_records = [r for r in caplog.records if not r.name.startswith("urllib3")]
    logged = "\n".join(r.getMessage() + (r.exc_text or "") for r in service_records)
    assert stored["id"] in logged, "the log names the patient by id"
    assert "/patients/<patient_id> 200" in logged, "requests are logged"
    for secret in SECRETS:
        assert secret not in logged
