"""Patient records read from files: FHIR JSON (a Patient or a Bundle), FHIR
NDJSON and Synthea CSV.

Every reader yields ``Record(ref, resource, problem)``. ``ref`` says where
the record is (file, line or entry, source id) and carries none of the
patient's data. A record has either a Patient ``resource`` to import or a
``problem`` saying why it cannot be read; with neither it is a resource of
another type in a Bundle, which is skipped and is not an error.
"""

import csv
import json
import logging
from pathlib import Path
from typing import NamedTuple

log = logging.getLogger(__name__)

SUFFIXES = (".json", ".ndjson", ".csv")
MAX_REF_ID_CHARS = 64

SYNTHEA_SYSTEM = "https://github.com/synthetichealth/synthea"
V2_0203 = "http://terminology.hl7.org/CodeSystem/v2-0203"
V3_MARITAL_STATUS = "http://terminology.hl7.org/CodeSystem/v3-MaritalStatus"

# Column, identifier system, v2-0203 type code and its display. The systems
# are those of Synthea's own FHIR export, so that a person exported both ways
# is recognised as the same person.
SYNTHEA_IDENTIFIERS = (
    ("Id", SYNTHEA_SYSTEM, None, None),
    ("SSN", "http://hl7.org/fhir/sid/us-ssn", "SS", "Social Security number"),
    ("DRIVERS", "urn:oid:2.16.840.1.113883.4.3.25", "DL", "Driver's license number"),
    (
        "PASSPORT",
        "http://standardhealthrecord.org/fhir/StructureDefinition/passportNumber",
        "PPN",
        "Passport number",
    ),
)
SYNTHEA_GENDERS = {"M": "male", "F": "female"}
MARITAL_STATUSES = {
    "A": "Annulled",
    "C": "Common Law",
    "D": "Divorced",
    "I": "Interlocutory",
    "L": "Legally Separated",
    "M": "Married",
    "P": "Polygamous",
    "S": "Never Married",
    "T": "Domestic partner",
    "U": "unmarried",
    "W": "Widowed",
}
# Column and the element of Address it fills.
SYNTHEA_ADDRESS = (
    ("ADDRESS", "line"),
    ("CITY", "city"),
    ("COUNTY", "district"),
    ("STATE", "state"),
    ("ZIP", "postalCode"),
)


class Record(NamedTuple):
    ref: str
    resource: dict | None = None
    problem: str | None = None

    @property
    def skipped(self):
        return self.resource is None and self.problem is None


class UnmappedCode(ValueError):
    """A Synthea cell holds a code the mapping does not know."""


def find_files(paths):
    """Yield ``(path, name)`` for each file given and each readable file
    under each directory given; ``name`` is the file's path relative to the
    directory it was found in."""
    for given in map(Path, paths):
        if given.is_dir():
            for path in sorted(given.rglob("*")):
                if path.is_file() and path.suffix.lower() in SUFFIXES:
                    yield path, path.relative_to(given).as_posix()
        else:
            yield given, given.name


def read_file(path, name=None):
    """Yield the records of one file, chosen by its suffix."""
    path = Path(path)
    name = name or path.name
    readers = {".json": read_json, ".ndjson": read_ndjson, ".csv": read_synthea_csv}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        yield Record(name, problem="is not a .json, .ndjson or .csv file")
        return
    try:
        yield from reader(path, name)
    except OSError as exc:
        yield Record(name, problem=f"cannot be read ({type(exc).__name__})")


def read_json(path, name):
    """A file holding one Patient, or a Bundle whose Patients are taken."""
    try:
        with open(path, encoding="utf-8-sig") as file:
            data = json.load(file)
    except UnicodeDecodeError:
        yield Record(name, problem="is not UTF-8 text")
        return
    except json.JSONDecodeError as exc:
        yield Record(name, problem=_json_problem(exc))
        return

    if isinstance(data, dict) and data.get("resourceType") == "Bundle":
        yield from _bundle_records(data, name)
    else:
        yield _resource_record(data, name)


def _bundle_records(bundle, name):
    entries = bundle.get("entry", [])
    if not isinstance(entries, list):
        yield Record(name, problem="Bundle.entry is not a list")
        return
    for index, entry in enumerate(entries):
        where = f"{name}:entry[{index}]"
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if isinstance(resource, dict) and resource.get("resourceType") != "Patient":
            yield Record(_ref(where, resource.get("id")))
        elif resource is None:
            # A transaction entry may hold only a request, such as a DELETE.
            yield Record(where)
        else:
            yield _resource_record(resource, where)


def read_ndjson(path, name):
    """One resource a line; a line that is not one is a record's problem."""
    with open(path, "rb") as file:
        for number, raw in enumerate(file, start=1):
            if not raw.strip():
                continue
            where = f"{name}:line {number}"
            try:
                text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
                data = json.loads(text.rstrip("\r\n"))
            except UnicodeDecodeError:
                yield Record(where, problem="is not UTF-8 text")
            except json.JSONDecodeError as exc:
                yield Record(where, problem=_json_problem(exc, lines=False))
            else:
                yield _resource_record(data, where)


def _resource_record(data, where):
    if not isinstance(data, dict):
        return Record(where, problem="is not a JSON object")
    ref = _ref(where, data.get("id"))
    kind = data.get("resourceType")
    if kind != "Patient":
        shown = kind if isinstance(kind, str) else "no resourceType"
        return Record(ref, problem=f"is not a Patient ({shown[:40]})")
    return Record(ref, data)


def read_synthea_csv(path, name):
    """The patients file of a Synthea CSV export, a Patient per row."""
    with open(path, encoding="utf-8-sig", newline="") as file:
        rows = csv.reader(file)
        try:
            header = next(rows, None)
            if not header or "Id" not in header:
                yield Record(name, problem="has no Synthea header (no Id column)")
                return
            for row in rows:
                if any(cell.strip() for cell in row):
                    yield _synthea_record(header, row, f"{name}:line {rows.line_num}")
        except UnicodeDecodeError:
            yield Record(name, problem=f"is not UTF-8 text after line {rows.line_num}")
        except csv.Error:
            yield Record(name, problem=f"is not valid CSV at line {rows.line_num}")


def _synthea_record(header, row, where):
    if len(row) != len(header):
        return Record(
            where, problem=f"has {len(row)} fields where the header has {len(header)}"
        )
    cells = dict(zip(header, row, strict=True))
    ref = _ref(where, cells.get("Id"))
    try:
        return Record(ref, synthea_patient(cells))
    except UnmappedCode as exc:
        return Record(ref, problem=str(exc))


def synthea_patient(cells):
    """An R4 Patient from a row of Synthea's patients.csv, given as a dict
    of column to cell. Empty cells leave their element out; money, race and
    ethnicity are not carried over."""
    cells = {column: value.strip() for column, value in cells.items() if value}
    cells = {column: value for column, value in cells.items() if value}
    patient = {"resourceType": "Patient"}
    elements = {
        "identifier": _synthea_identifiers(cells),
        "name": _synthea_names(cells),
        "gender": SYNTHEA_GENDERS.get(_code(cells, "GENDER", SYNTHEA_GENDERS)),
        "birthDate": cells.get("BIRTHDATE"),
        "deceasedDateTime": cells.get("DEATHDATE"),
        "address": _synthea_address(cells),
        "maritalStatus": _marital_status(cells),
    }
    patient.update((key, value) for key, value in elements.items() if value)
    return patient


def _synthea_identifiers(cells):
    identifiers = []
    for column, system, type_code, display in SYNTHEA_IDENTIFIERS:
        if column not in cells:
            continue
        identifier = {"system": system, "value": cells[column]}
        if type_code:
            coding = {"system": V2_0203, "code": type_code, "display": display}
            identifier = {"type": {"coding": [coding]}, **identifier}
        identifiers.append(identifier)
    return identifiers


def _synthea_names(cells):
    given = [cells[c] for c in ("FIRST", "MIDDLE") if c in cells]
    official = _name(
        "official",
        prefix=[cells["PREFIX"]] if "PREFIX" in cells else None,
        given=given,
        family=cells.get("LAST"),
        suffix=[cells["SUFFIX"]] if "SUFFIX" in cells else None,
    )
    maiden = _name("maiden", given=given, family=cells.get("MAIDEN"))
    names = [official] if len(official) > 1 else []
    if "family" in maiden:
        names.append(maiden)
    return names


def _name(use, **parts):
    return {"use": use, **{part: value for part, value in parts.items() if value}}


def _synthea_address(cells):
    address = {}
    for column, element in SYNTHEA_ADDRESS:
        if column in cells:
            address[element] = [cells[column]] if element == "line" else cells[column]
    return [address] if address else []


def _code(cells, column, codes):
    """The cell of ``column`` if it is one of ``codes``; None if empty."""
    code = cells.get(column)
    if code is not None and code not in codes:
        raise UnmappedCode(f"{column} is not one of {', '.join(codes)}")
    return code


def _marital_status(cells):
    code = _code(cells, "MARITAL", MARITAL_STATUSES)
    if code is None:
        return None
    display = MARITAL_STATUSES[code]
    coding = {"system": V3_MARITAL_STATUS, "code": code, "display": display}
    return {"coding": [coding], "text": display}


def _ref(where, source_id):
    if not isinstance(source_id, str) or not source_id:
        return where
    return f"{where} id={source_id[:MAX_REF_ID_CHARS]}"


def _json_problem(exc, lines=True):
    where = f"line {exc.lineno}, column {exc.colno}" if lines else f"column {exc.colno}"
    return f"is not valid JSON: {exc.msg} ({where})"
