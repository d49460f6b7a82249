"""No input, however malformed, gets anything but a typed error back."""

import contextlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nameko.exceptions import IncorrectSignature, MethodNotFound

from patient.errors import (
    InvalidPatient,
    InvalidRequest,
    InvalidSearch,
    PatientNotFound,
    PatientServiceError,
)
from tests.factories import patient

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)

# Each example is a real call: fewer of them, no per-example deadline, and
# the service fixture shared by all of them.
through_the_service = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

MALFORMED = [
    None,
    "",
    "'; DROP TABLE patients; --",
    42,
    [],
    [patient()],
    {"resourceType": "Patient", "name": [{"family": "x' OR 1=1 --"}]},
    {"resourceType": "Patient", "id": "../../etc/passwd"},
    {"resourceType": "Patient", "birthDate": None},
    {"resourceType": "Patient", "identifier": "12345"},
    {"resourceType": "Patient", "extension": [{"url": 5}]},
    {"resourceType": "Patient", "name": [{"family": "x" * 100_000}]},
    {"resourceType": "Patient", "text": {"status": "generated", "div": "<p>x</p>"}},
]


@pytest.mark.parametrize("value", MALFORMED)
def test_malformed_registrations_get_typed_errors(patients, value):
    with contextlib.suppress(PatientServiceError):
        patients.register_patient(value)


@pytest.mark.parametrize("value", MALFORMED + [{"x": 1}])
def test_malformed_arguments_to_reads_get_typed_errors(patients, value):
    with pytest.raises((PatientNotFound, InvalidRequest, InvalidSearch)):
        patients.get_patient(value)
    with pytest.raises((PatientNotFound, InvalidRequest)):
        patients.find_patient_by_identifier(value, value)
    with pytest.raises(InvalidSearch):
        patients.search_patients(value if value != {} else {"x": 1}, count=value)


def test_malformed_updates_get_typed_errors(patients):
    stored = patients.register_patient(patient())
    for value in MALFORMED:
        with pytest.raises((InvalidPatient, InvalidRequest)):
            patients.update_patient(stored["id"], value, "abc")
        with contextlib.suppress(PatientServiceError):
            patients.update_patient(stored["id"], value, 1)


def test_wrong_argument_names_are_refused_by_signature(patients):
    with pytest.raises(IncorrectSignature):
        patients.register_patient(resource=patient())


def test_unknown_method_is_refused(patients):
    with pytest.raises(MethodNotFound):
        patients.drop_all_patients()


@through_the_service
@given(
    resource=st.fixed_dictionaries(
        {"resourceType": st.just("Patient")},
        optional={
            "name": json_values,
            "birthDate": json_values,
            "identifier": json_values,
            "telecom": json_values,
            "gender": json_values,
            "extension": json_values,
        },
    )
)
def test_arbitrary_json_registers_or_gets_a_typed_error(patients, resource):
    try:
        stored = patients.register_patient(resource)
    except PatientServiceError:
        return
    assert patients.get_patient(stored["id"]) == stored


@through_the_service
@given(
    criteria=st.dictionaries(
        st.sampled_from(
            [
                "name",
                "family",
                "given",
                "birthdate",
                "identifier",
                "phone",
                "email",
                "gender",
                "active",
                "other",
            ]
        ),
        json_values,
        max_size=3,
    )
)
def test_arbitrary_search_criteria_answer_or_get_invalid_search(patients, criteria):
    try:
        page = patients.search_patients(criteria)
    except InvalidSearch:
        return
    assert page["next_cursor"] is None or isinstance(page["next_cursor"], str)


@pytest.mark.parametrize("text", ["\x00", "a\ud800b", "\x1b[31m"])
def test_unstorable_strings_anywhere_get_typed_errors(patients, text):
    with pytest.raises(InvalidPatient):
        patients.register_patient(patient(name=[{"family": text}]))
    with pytest.raises(InvalidRequest):
        patients.register_patient(patient(), idempotency_key=text)
    with pytest.raises(InvalidRequest):
        patients.find_patient_by_identifier("urn:test:mrn", text)
    with pytest.raises(InvalidRequest):
        patients.find_patient_by_identifier(text, "x")
    for criterion in ("name", "family", "email", "phone", "birthdate", "identifier"):
        with pytest.raises(InvalidSearch):
            patients.search_patients({criterion: text})
    with pytest.raises(InvalidSearch):
        patients.search_patients({"identifier": {"system": "urn:x", "value": text}})


def test_a_bad_entry_in_a_batch_fails_alone(patients):
    results = patients.register_patients(
        [
            {"resource": patient(), "idempotency_key": "bad\x00key"},
            {"resource": patient(name=[{"family": "a\ud800"}])},
            {"resource": patient()},
        ]
    )

    assert [r["status"] for r in results] == ["invalid", "invalid", "created"]


@pytest.mark.parametrize("version", ["²", "١", "1e3", " 1", "9999999999"])
def test_versions_must_be_plain_digits(patients, version):
    stored = patients.register_patient(patient())

    with pytest.raises(InvalidRequest):
        patients.update_patient(stored["id"], stored, version)
    with pytest.raises(InvalidRequest):
        patients.deactivate_patient(stored["id"], version)
