"""FHIR-style Patient search through the running service."""

import pytest

from patient.errors import InvalidSearch
from tests.factories import example, patient


def ids(page):
    return {p["id"] for p in page["patients"]}


@pytest.fixture
def people(patients):
    made = {
        "bénédicte": patient(name=[{"family": "du Marché", "given": ["Bénédicte"]}]),
        "van": patient(name=[{"family": "van de Heuvel", "given": ["Pieter"]}]),
        "obrien": patient(name=[{"family": "O'Brien", "given": ["Seán", "Mary Ann"]}]),
        "greek": patient(name=[{"family": "Παπαδοπούλου", "given": ["Ελένη"]}]),
        "russian": patient(name=[{"family": "Иванова", "given": ["Ёлка"]}]),
        "chinese": patient(name=[{"text": "张无忌"}]),
        "nameless": patient(name=[]),
        "lukasz": patient(name=[{"family": "Łukasiewicz", "given": ["Jan"]}]),
        "curly": patient(name=[{"family": "D’Angelo"}]),
        "dashed": patient(name=[{"family": "Smith\u2010Jones", "given": ["Jean-Luc"]}]),
    }
    made["nameless"].pop("name")
    return {key: patients.register_patient(r)["id"] for key, r in made.items()}


@pytest.mark.parametrize(
    ("criteria", "who"),
    [
        ({"name": "marche"}, {"bénédicte"}),
        ({"name": "BENED"}, {"bénédicte"}),
        ({"family": "du m"}, {"bénédicte"}),
        ({"family": "heuv"}, {"van"}),
        ({"family": "van de h"}, {"van"}),
        ({"family": "obri"}, {"obrien"}),
        ({"family": "o'b"}, {"obrien"}),
        ({"given": "sean"}, {"obrien"}),
        ({"given": "mary a"}, {"obrien"}),
        ({"given": "ann"}, {"obrien"}),
        ({"family": "παπαδο"}, {"greek"}),
        ({"given": "ελενη"}, {"greek"}),
        ({"name": "ελένη"}, {"greek"}),
        ({"family": "ИВАН"}, {"russian"}),
        ({"given": "елка"}, {"russian"}),
        ({"name": "张"}, {"chinese"}),
        ({"name": "无忌"}, {"chinese"}),
        ({"family": "lukas"}, {"lukasz"}),
        ({"family": "O’Brien"}, {"obrien"}),
        ({"family": "d'angelo"}, {"curly"}),
        ({"family": "smith-jones"}, {"dashed"}),
        ({"family": "smith jones"}, {"dashed"}),
        ({"family": "smithjo"}, {"dashed"}),
        ({"family": "jones"}, {"dashed"}),
        ({"given": "jean luc"}, {"dashed"}),
        ({"given": "jeanluc"}, {"dashed"}),
        ({"name": "testperson"}, set()),
        ({"given": "heuvel"}, set()),
        ({"name": "%"}, set()),
        ({"name": "_"}, set()),
    ],
)
def test_name_search_is_a_case_and_accent_free_prefix_in_any_script(
    patients, people, criteria, who
):
    assert ids(patients.search_patients(criteria)) == {people[w] for w in who}


def test_name_criteria_combine_with_and(patients, people):
    found = patients.search_patients({"family": "o'brien", "given": ["sean", "mary"]})
    assert ids(found) == {people["obrien"]}
    assert (
        ids(patients.search_patients({"family": "obrien", "given": "pieter"})) == set()
    )


@pytest.fixture
def born(patients):
    dates = {
        "1974": "1974",
        "1974-12": "1974-12",
        "1974-12-25": "1974-12-25",
        "1975-01-01": "1975-01-01",
        "1973-12-31": "1973-12-31",
    }
    made = {
        k: patients.register_patient(patient(birthDate=v))["id"]
        for k, v in dates.items()
    }
    undated = patient()
    undated.pop("birthDate")
    made["none"] = patients.register_patient(undated)["id"]
    return made


@pytest.mark.parametrize(
    ("birthdate", "who"),
    [
        ("1974", {"1974", "1974-12", "1974-12-25"}),
        ("eq1974", {"1974", "1974-12", "1974-12-25"}),
        ("1974-12", {"1974-12", "1974-12-25"}),
        ("1974-12-25", {"1974-12-25"}),
        ("ge1975", {"1975-01-01"}),
        ("gt1974", {"1975-01-01"}),
        ("ge1974-12-25", {"1974", "1974-12", "1974-12-25", "1975-01-01"}),
        # A year reaches above one of its days, so it matches gt that day.
        ("gt1974-12-25", {"1974", "1974-12", "1975-01-01"}),
        ("lt1974", {"1973-12-31"}),
        ("le1974-01", {"1973-12-31"}),
        ("lt1974-12-25", {"1973-12-31", "1974", "1974-12"}),
    ],
)
def test_birthdate_search_follows_fhir_date_ranges(patients, born, birthdate, who):
    found = patients.search_patients({"birthdate": birthdate})
    assert ids(found) == {born[w] for w in who}


def test_birthdate_criteria_combine_into_a_range(patients, born):
    found = patients.search_patients({"birthdate": ["ge1974-06", "lt1975"]})
    assert ids(found) == {born["1974"], born["1974-12"], born["1974-12-25"]}


@pytest.mark.parametrize(
    ("phone", "found"),
    [
        ("(03) 5555 6473", True),
        ("03 5555 6473", True),
        ("+61 3 5555 6473", True),
        ("0355556473", True),
        ("(03) 5555 6474", False),
    ],
)
def test_phone_matches_whatever_the_formatting(patients, phone, found):
    stored = patients.register_patient(example())

    assert ids(patients.search_patients({"phone": phone})) == (
        {stored["id"]} if found else set()
    )


def test_phone_stored_in_international_form_is_found_in_national_form(patients):
    stored = patients.register_patient(
        patient(telecom=[{"system": "phone", "value": "+1 (555) 555-2003"}])
    )

    for written in ("555-555-2003", "5555552003", "1 555 555 2003"):
        assert ids(patients.search_patients({"phone": written})) == {stored["id"]}


@pytest.mark.parametrize(
    ("stored", "searched"),
    [
        ("+44 20 7946 0958", "+1 207 946 0958"),
        ("+49 30 123456", "+33 30 123456"),
        ("(207) 946-0958", "+44 20 7946 0958"),
    ],
)
def test_a_number_with_a_country_code_never_finds_another_country(
    patients, stored, searched
):
    patients.register_patient(patient(telecom=[{"system": "phone", "value": stored}]))

    assert patients.search_patients({"phone": searched})["patients"] == []
    assert len(patients.search_patients({"phone": stored})["patients"]) == 1


def test_a_number_stored_with_its_country_code_is_found_in_national_form(patients):
    stored = patients.register_patient(
        patient(telecom=[{"system": "phone", "value": "+61 3 5555 6473"}])
    )

    for written in ("(03) 5555 6473", "03 5555 6473", "0355556473"):
        assert ids(patients.search_patients({"phone": written})) == {stored["id"]}


def test_email_is_case_insensitive(patients):
    stored = patients.register_patient(
        patient(telecom=[{"system": "email", "value": "Jane.Doe@Example.ORG"}])
    )

    assert ids(patients.search_patients({"email": "jane.doe@example.org"})) == {
        stored["id"]
    }
    assert ids(patients.search_patients({"email": "jane@example.org"})) == set()


def test_identifier_search_by_token_value_and_mapping(patients):
    system = "urn:test:pipes"
    stored = patients.register_patient(
        patient(identifier=[{"system": system, "value": "a|b,c\\d"}])
    )
    loose = patients.register_patient(patient(identifier=[{"value": "no-system"}]))

    for criteria in (
        {"identifier": f"{system}|a\\|b,c\\\\d"},
        {"identifier": {"system": system, "value": "a|b,c\\d"}},
        {"identifier": {"value": "a|b,c\\d"}},
        {"identifier": f"{system}|"},
    ):
        assert ids(patients.search_patients(criteria)) == {stored["id"]}, criteria
    assert ids(patients.search_patients({"identifier": "|no-system"})) == {loose["id"]}
    assert ids(patients.search_patients({"identifier": "no-system"})) == {loose["id"]}
    assert ids(patients.search_patients({"identifier": "urn:other|a|b"})) == set()


def test_gender_and_active(patients):
    male = patients.register_patient(patient(gender="male"))["id"]
    female = patients.register_patient(patient(gender="female"))["id"]
    patients.deactivate_patient(female)

    assert ids(patients.search_patients({"gender": "male"})) == {male}
    assert ids(patients.search_patients({"active": True})) == {male}
    assert ids(patients.search_patients({"active": "false"})) == {female}


def test_paging_returns_every_record_once_and_ends_with_null_cursor(patients):
    made = {patients.register_patient(patient())["id"] for _ in range(25)}

    seen, cursor, pages = [], None, 0
    while True:
        page = patients.search_patients({"family": "testp"}, count=10, cursor=cursor)
        assert page["patients"], "no empty page"
        seen += [p["id"] for p in page["patients"]]
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert pages == 3
    assert len(seen) == len(set(seen)) == 25
    assert set(seen) == made


def test_exact_multiple_of_count_has_no_empty_last_page(patients):
    for _ in range(4):
        patients.register_patient(patient())

    first = patients.search_patients({}, count=2)
    second = patients.search_patients({}, count=2, cursor=first["next_cursor"])

    assert len(second["patients"]) == 2
    assert second["next_cursor"] is None


def test_paging_is_stable_while_others_write_between_pages(patients):
    before = {patients.register_patient(patient())["id"] for _ in range(12)}

    seen, cursor = [], None
    while True:
        page = patients.search_patients(
            {"family": "testperson"}, count=5, cursor=cursor
        )
        seen += [p["id"] for p in page["patients"]]
        # Writes between pages: new patients, and updates of seen ones.
        patients.register_patient(patient())
        first = patients.get_patient(seen[0])
        patients.update_patient(first["id"], first, first["meta"]["versionId"])
        cursor = page["next_cursor"]
        if cursor is None:
            break

    assert len(seen) == len(set(seen))
    assert before <= set(seen)


@pytest.mark.parametrize(
    ("criteria", "count", "cursor"),
    [
        ({"surname": "x"}, 20, None),
        ({"name": ""}, 20, None),
        ({"name": 5}, 20, None),
        ({"name": "x" * 101}, 20, None),
        ({"name": "   "}, 20, None),
        ({"birthdate": "ap1974"}, 20, None),
        ({"birthdate": "1974-13"}, 20, None),
        ({"birthdate": "1974-02-30"}, 20, None),
        ({"birthdate": "yesterday"}, 20, None),
        ({"gender": "robot"}, 20, None),
        ({"active": "maybe"}, 20, None),
        ({"phone": "call me"}, 20, None),
        ({"identifier": {"code": "x"}}, 20, None),
        ({"identifier": ""}, 20, None),
        ({}, 0, None),
        ({}, 101, None),
        ({}, "20", None),
        ({}, None, None),
        ({}, 20, "not-a-cursor"),
        ("name=smith", 20, None),
        (None, 20, None),
        (["name"], 20, None),
    ],
)
def test_bad_search_is_refused_with_invalid_search(patients, criteria, count, cursor):
    with pytest.raises(InvalidSearch):
        patients.search_patients(criteria, count=count, cursor=cursor)


def test_cursor_of_another_search_is_refused(patients):
    for _ in range(3):
        patients.register_patient(patient())
    page = patients.search_patients({"gender": "female"}, count=1)

    with pytest.raises(InvalidSearch) as raised:
        patients.search_patients(
            {"gender": "male"}, count=1, cursor=page["next_cursor"]
        )
    assert "cursor" in raised.value.errors
