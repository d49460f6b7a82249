"""Reading patient records from FHIR JSON, FHIR NDJSON and Synthea CSV.

The files under tests/data/import are unedited records copied from the
shared data; broken input is written by each test that needs it.
"""

import csv
import json
from pathlib import Path

import pytest

from patient import sources
from patient.fhir import validate_patient

DATA = Path(__file__).resolve().parent / "data" / "import"
SSN = "http://hl7.org/fhir/sid/us-ssn"


def read(name):
    return list(sources.read_file(DATA / name, name))


def csv_row(synthea_id, name="patients-excerpt.csv"):
    with open(DATA / name, newline="") as file:
        return next(row for row in csv.DictReader(file) if row["Id"] == synthea_id)


def mapped(synthea_id, name="patients-excerpt.csv"):
    return sources.synthea_patient(csv_row(synthea_id, name))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_csv_row_becomes_an_r4_patient():
    patient = mapped("32be5666-01b5-5aa9-f305-66f47f6b8022")

    assert patient == {
        "resourceType": "Patient",
        "identifier": [
            {
                "system": "https://github.com/synthetichealth/synthea",
                "value": "32be5666-01b5-5aa9-f305-66f47f6b8022",
            },
            {
                "type": {"coding": [_v2("SS", "Social Security number")]},
                "system": SSN,
                "value": "999-96-1969",
            },
            {
                "type": {"coding": [_v2("DL", "Driver's license number")]},
                "system": "urn:oid:2.16.840.1.113883.4.3.25",
                "value": "S99942043",
            },
            {
                "type": {"coding": [_v2("PPN", "Passport number")]},
                "system": "http://standardhealthrecord.org/fhir/"
                "StructureDefinition/passportNumber",
                "value": "X51255446X",
            },
        ],
        "name": [
            {
                "use": "official",
                "prefix": ["Mrs."],
                "given": ["Amiee221", "Melany872"],
                "family": "Bahringer146",
                "suffix": ["PhD"],
            },
            {
                "use": "maiden",
                "given": ["Amiee221", "Melany872"],
                "family": "Goodwin327",
            },
        ],
        "gender": "female",
        "birthDate": "1916-09-15",
        "deceasedDateTime": "2008-05-06",
        "address": [
            {
                "line": ["439 Dietrich Rapid Unit 22"],
                "city": "Melrose",
                "district": "Middlesex County",
                "state": "Massachusetts",
                "postalCode": "02176",
            }
        ],
        "maritalStatus": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus",
                    "code": "M",
                    "display": "Married",
                }
            ],
            "text": "Married",
        },
    }


def _v2(code, display):
    return {
        "system": "http://terminology.hl7.org/CodeSystem/v2-0203",
        "code": code,
        "display": display,
    }


def test_csv_zip_code_keeps_its_leading_zero():
    patient = mapped("9436ac89-2499-2406-2a0b-e362bcc4eefd")

    assert patient["address"][0]["postalCode"] == "01810"


def test_csv_swedish_postcode_keeps_its_space():
    patient = mapped("838e3532-0deb-eb80-3c5e-f5b4c243efaa", "patients-se-excerpt.csv")

    assert patient["address"][0]["postalCode"] == "141 34"


def test_csv_empty_cells_leave_their_elements_out():
    patient = mapped("9436ac89-2499-2406-2a0b-e362bcc4eefd")

    assert "deceasedDateTime" not in patient
    assert "maritalStatus" not in patient
    assert [i["system"] for i in patient["identifier"]] == [
        "https://github.com/synthetichealth/synthea",
        SSN,
    ]
    assert patient["name"] == [
        {"use": "official", "given": ["Aurea194", "Shela13"], "family": "Welch179"}
    ]


def test_csv_without_middle_name_has_one_given_name():
    patient = mapped("2482686d-4161-bad9-0805-c11fabe55cf4")

    assert [name["given"] for name in patient["name"]] == [["Annabel185"]] * 2


def test_csv_gender_letters_become_fhir_genders():
    assert mapped("9436ac89-2499-2406-2a0b-e362bcc4eefd")["gender"] == "female"
    assert mapped("7e89f21d-ad08-95ba-f074-738662bb8ef0")["gender"] == "male"


def test_csv_money_race_and_ethnicity_are_not_carried_over():
    text = json.dumps(mapped("a9765d90-2ea9-b366-6972-de51bdd306a9"))

    for left_out in ("white", "nonhispanic", "HEALTHCARE", "INCOME", "extension"):
        assert left_out not in text


def test_csv_rows_map_to_valid_r4_patients():
    for name in ("patients-excerpt.csv", "patients-se-excerpt.csv"):
        for record in read(name):
            validate_patient(record.resource)


def test_csv_ref_is_file_line_and_synthea_id():
    refs = [record.ref for record in read("patients-excerpt.csv")]

    assert refs[0] == (
        "patients-excerpt.csv:line 2 id=9436ac89-2499-2406-2a0b-e362bcc4eefd"
    )
    assert len(refs) == 6


def test_csv_unknown_gender_code_rejects_the_row_and_names_the_column(tmp_path):
    header = (DATA / "patients-excerpt.csv").read_text().splitlines()[0]
    row = "abc,2000-01-01,,,,,,Kim,,Doe,,,,,,X" + "," * (header.count(",") - 15)
    path = write(tmp_path, "odd.csv", f"{header}\n{row}\n")

    [record] = sources.read_file(path)

    assert record.resource is None
    assert record.problem == "GENDER is not one of M, F"
    assert record.ref == "odd.csv:line 2 id=abc"


def test_csv_row_with_missing_fields_is_rejected_and_reading_goes_on(tmp_path):
    lines = (DATA / "patients-excerpt.csv").read_text().splitlines()
    path = write(tmp_path, "short.csv", "\n".join([lines[0], "abc,2000", lines[1]]))

    short, good = sources.read_file(path)

    assert short.problem == "has 2 fields where the header has 28"
    assert good.resource["birthDate"] == "2024-06-16"


def test_csv_without_synthea_header_is_one_rejected_record(tmp_path):
    path = write(tmp_path, "other.csv", "a,b\n1,2\n")

    assert list(sources.read_file(path)) == [
        sources.Record("other.csv", problem="has no Synthea header (no Id column)")
    ]


def test_json_file_with_one_patient_is_one_record():
    [record] = read("patient-example-mom.json")

    assert record.ref == "patient-example-mom.json id=mom"
    assert record.resource["identifier"][0]["value"] == "444222222"
    assert record.problem is None


def test_bundle_yields_its_patients_and_skips_other_resources():
    records = read("synthea-bundle-excerpt.json")

    assert [r.resource["resourceType"] for r in records if r.resource] == ["Patient"]
    assert [r.skipped for r in records] == [False, True, True]
    assert not any(r.problem for r in records)


def test_bundle_entry_ref_gives_entry_index_and_resource_id():
    records = read("patient-examples-general-excerpt.json")

    assert [r.ref for r in records] == [
        f"patient-examples-general-excerpt.json:entry[{i}] id={i + 1}" for i in range(3)
    ]


def test_ndjson_reads_a_patient_per_line():
    records = read("Patient-excerpt.ndjson")

    assert [r.ref.split(" id=")[0] for r in records] == [
        f"Patient-excerpt.ndjson:line {n}" for n in (1, 2, 3)
    ]
    assert all(r.resource["resourceType"] == "Patient" for r in records)


def test_ndjson_bad_lines_are_rejected_records_and_reading_goes_on(tmp_path):
    good = (DATA / "Patient-excerpt.ndjson").read_text().splitlines()[0]
    observation = '{"resourceType": "Observation", "id": "obs-1"}'
    lines = [good, '{"resourceType": "Pat', "", "[1, 2]", observation, good]
    path = write(tmp_path, "mixed.ndjson", "\n".join(lines) + "\n")

    records = list(sources.read_file(path))

    good_id = json.loads(good)["id"]
    assert [(r.ref, r.problem) for r in records] == [
        (f"mixed.ndjson:line 1 id={good_id}", None),
        (
            "mixed.ndjson:line 2",
            "is not valid JSON: Unterminated string starting at (column 18)",
        ),
        ("mixed.ndjson:line 4", "is not a JSON object"),
        ("mixed.ndjson:line 5 id=obs-1", "is not a Patient (Observation)"),
        (f"mixed.ndjson:line 6 id={good_id}", None),
    ]


def test_ndjson_line_that_is_not_utf8_is_rejected(tmp_path):
    path = tmp_path / "latin1.ndjson"
    path.write_bytes(b'{"resourceType": "Patient", "id": "x\xe9"}\n')

    [record] = sources.read_file(path)

    assert record.problem == "is not UTF-8 text"


def test_json_file_that_is_not_json_is_one_rejected_record(tmp_path):
    path = write(tmp_path, "broken.json", '{"resourceType": "Patient",')

    [record] = sources.read_file(path)

    assert record.ref == "broken.json"
    assert record.problem.startswith("is not valid JSON")


def test_json_file_holding_another_resource_is_rejected(tmp_path):
    path = write(tmp_path, "obs.json", '{"resourceType": "Observation"}')

    [record] = sources.read_file(path)

    assert record.problem == "is not a Patient (Observation)"


def test_directory_walk_finds_json_ndjson_and_csv_files(tmp_path):
    (tmp_path / "deeper").mkdir()
    for name in ("a.json", "deeper/b.NDJSON", "c.csv", "notes.txt", "d.json.bak"):
        write(tmp_path, name, "")

    found = [name for _, name in sources.find_files([tmp_path])]

    assert found == ["a.json", "c.csv", "deeper/b.NDJSON"]


def test_file_given_by_name_is_read_whatever_its_folder():
    [(path, name)] = sources.find_files([DATA / "patient-example-mom.json"])

    assert name == "patient-example-mom.json"


def test_refs_carry_no_names_or_identifier_values():
    records = [
        record
        for path, name in sources.find_files([DATA])
        for record in sources.read_file(path, name)
        if record.resource
    ]

    for record in records:
        resource = record.resource
        private = [n.get("family") for n in resource.get("name", [])]
        private += [g for n in resource.get("name", []) for g in n.get("given", [])]
        # Synthea's id is the record's id in its source, and meant to be shown.
        source_ids = {resource.get("id"), *_synthea_ids(resource)}
        private += [
            i.get("value")
            for i in resource.get("identifier", [])
            if i.get("value") not in source_ids
        ]
        leaked = [p for p in private if p and p in record.ref]
        assert not leaked, record.ref


def _synthea_ids(resource):
    return [
        i.get("value")
        for i in resource.get("identifier", [])
        if i.get("system") == sources.SYNTHEA_SYSTEM
    ]


@pytest.mark.parametrize(
    "code, display", [("M", "Married"), ("S", "Never Married"), ("W", "Widowed")]
)
def test_csv_marital_letters_are_v3_marital_status_codes(code, display):
    row = {**csv_row("9436ac89-2499-2406-2a0b-e362bcc4eefd"), "MARITAL": code}

    status = sources.synthea_patient(row)["maritalStatus"]

    assert status["coding"][0]["code"] == code
    assert status["text"] == display
