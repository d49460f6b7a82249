"""The shape of a Patient and the service's limits (no service needed)."""

import json

import pytest

from patient import fhir
from patient.errors import InvalidPatient
from patient.fhir import validate_patient
from tests.conftest import SHARED_DATA
from tests.factories import example, patient


def shared_patients():
    for path in sorted((SHARED_DATA / "fhir-r4").glob("*.json")):
        data = json.loads(path.read_text())
        if data["resourceType"] == "Bundle":
            for number, entry in enumerate(data.get("entry", [])):
                if entry.get("resource", {}).get("resourceType") == "Patient":
                    yield f"{path.name}#{number}", entry["resource"]
        else:
            yield path.name, data


def errors_of(resource):
    with pytest.raises(InvalidPatient) as raised:
        validate_patient(resource)
    return raised.value.errors


def test_every_published_r4_patient_example_is_valid():
    checked = 0
    for name, resource in shared_patients():
        try:
            validate_patient(resource)
        except InvalidPatient as exc:
            pytest.fail(f"{name}: {exc.errors}")
        checked += 1
    assert checked >= 250


@pytest.mark.parametrize("birth_date", ["1974", "1974-12", "1974-12-25"])
def test_partial_birth_dates_are_valid(birth_date):
    validate_patient(patient(birthDate=birth_date))


@pytest.mark.parametrize(
    ("elements", "path"),
    [
        ({"favouriteColour": "blue"}, "favouriteColour"),
        ({"gender": "robot"}, "gender"),
        ({"gender": "Male"}, "gender"),
        ({"birthDate": "1990-02-30"}, "birthDate"),
        ({"birthDate": "1974-12-25T10:00:00Z"}, "birthDate"),
        ({"deceasedDateTime": "2020-13-01"}, "deceasedDateTime"),
        ({"active": "yes"}, "active"),
        ({"active": 1}, "active"),
        ({"multipleBirthInteger": True}, "multipleBirthInteger"),
        ({"name": "Smith"}, "name"),
        ({"name": [{"given": "Jane"}]}, "name[0].given"),
        ({"name": [{"use": "nick"}]}, "name[0].use"),
        ({"telecom": [{"system": "pigeon", "value": "x"}]}, "telecom[0].system"),
        ({"telecom": [{"system": "phone", "use": "cell"}]}, "telecom[0].use"),
        ({"address": [{"type": "moon"}]}, "address[0].type"),
        (
            {"link": [{"other": {"reference": "Patient/1"}, "type": "x"}]},
            "link[0].type",
        ),
        (
            {"communication": [{"language": {"text": "nl"}, "preferred": "true"}]},
            "communication[0].preferred",
        ),
        ({"gender": None}, "gender"),
        ({"name": [{"text": "Jane\x00"}]}, "name[0].text"),
        ({"name": [{"text": "Jane\ud800"}]}, "name[0].text"),
        ({"name": [{"text": ""}]}, "name[0].text"),
        ({"identifier": [{}]}, "identifier[0]"),
        ({"identifier": []}, "identifier"),
        (
            {"identifier": [{"system": "urn:x", "value": "9" * 1001}]},
            "identifier[0].value",
        ),
        ({"contained": [{"resourceType": "NoSuchType"}]}, "resource"),
    ],
)
def test_invalid_elements_are_named_by_path(elements, path):
    assert path in errors_of(patient(**elements))


def test_messages_do_not_repeat_the_value_given():
    errors = errors_of(patient(gender="Zorblax", birthDate="Zorblax-01"))
    assert "Zorblax" not in json.dumps(errors)


def test_other_resource_types_are_refused():
    assert "resourceType" in errors_of({"resourceType": "Observation"})
    assert "resourceType" in errors_of({"name": [{"family": "Nobody"}]})


@pytest.mark.parametrize("value", [None, [], "Patient", 42, b"{}"])
def test_a_resource_must_be_an_object(value):
    assert "resource" in errors_of(value)


def test_deep_nesting_is_refused_before_parsing():
    resource = patient()
    node = resource
    for _ in range(fhir.MAX_DEPTH + 5):
        child = {"url": "urn:x", "extension": []}
        node.setdefault("extension", []).append(child)
        node = child
    assert "nested deeper" in json.dumps(errors_of(resource))


def test_long_lists_strings_and_large_resources_are_refused():
    many = [{"family": "X"}] * (fhir.MAX_LIST_ITEMS + 1)
    assert "name" in errors_of(patient(name=many))

    long_text = "x" * (fhir.MAX_STRING_CHARS + 1)
    assert "name[0].text" in errors_of(patient(name=[{"text": long_text}]))

    photo = {"contentType": "image/png", "data": "A" * fhir.MAX_RESOURCE_BYTES}
    assert "resource" in errors_of(patient(photo=[photo]))


def test_attachment_data_may_be_longer_than_other_strings():
    photo = {"contentType": "image/png", "data": "QUJD" * 10_000}
    validate_patient(patient(photo=[photo]))


def test_the_copied_example_is_valid():
    validate_patient(example())
    validate_patient(example("patient-example-chinese.json"))
