"""The import command, through the running service on the real broker and
database."""

import collections
import csv
import json
import re
import subprocess
import sys

import pytest
import yaml
from conftest import ROOT, SHARED_DATA
from nameko.exceptions import RpcTimeout, UnknownService
from sqlalchemy import func, select

from patient import importer, sources
from patient.errors import InternalError, InvalidPatient
from patient.fhir import validate_patient
from patient.models import Patient, PatientIdentifier

DATA = ROOT / "tests" / "data" / "import"
SSN = "http://hl7.org/fhir/sid/us-ssn"
DUTCH_BSN = "urn:oid:2.16.840.1.113883.2.4.6.3"
SUMMARY_LABELS = (
    "files read",
    "records read",
    "created",
    "already imported",
    "duplicates",
    "rejected",
    "skipped",
)


def report_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def stored_count(db):
    db.rollback()
    return db.execute(select(func.count()).select_from(Patient)).scalar_one()


def holder_of(db, system, value):
    db.rollback()
    return str(
        db.execute(
            select(PatientIdentifier.patient_id).where(
                PatientIdentifier.system == system, PatientIdentifier.value == value
            )
        ).scalar_one()
    )


def config_file(tmp_path, config):
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_import_key_is_the_same_for_the_same_content_in_any_order():
    first = {"resourceType": "Patient", "gender": "male", "birthDate": "1970"}
    second = {"birthDate": "1970", "gender": "male", "resourceType": "Patient"}

    assert importer.import_key(first) == importer.import_key(second)
    assert importer.import_key(first) != importer.import_key({**first, "gender": "x"})
    assert importer.import_key(first).startswith("import:")


def test_config_file_takes_amqp_uri_from_the_environment(tmp_path, monkeypatch):
    path = tmp_path / "config.yml"
    path.write_text("AMQP_URI: ${IMPORT_TEST_AMQP_URI:amqp://127.0.0.1/}\n")

    monkeypatch.delenv("IMPORT_TEST_AMQP_URI", raising=False)
    assert importer.load_config(path) == {"AMQP_URI": "amqp://127.0.0.1/"}

    monkeypatch.setenv("IMPORT_TEST_AMQP_URI", "amqp://127.0.0.1:5673/x")
    assert importer.load_config(path) == {"AMQP_URI": "amqp://127.0.0.1:5673/x"}


def test_import_reports_each_record_not_stored_with_its_reason(
    service, config, db, tmp_path
):
    broken = tmp_path / "broken.ndjson"
    invalid = {"resourceType": "Patient", "id": "bad-1", "gender": "x"}
    observation = {"resourceType": "Observation", "id": "obs-1"}
    lines = [json.dumps(invalid), '{"resourceType": ', json.dumps(observation)]
    broken.write_text("\n".join(lines) + "\n")
    report = tmp_path / "report.jsonl"

    summary = importer.run_import([DATA, broken], config, report, batch_size=4)

    mom = holder_of(db, SSN, "444222222")
    arline = holder_of(
        db, sources.SYNTHEA_SYSTEM, "8c5fff17-c01f-61f3-9f7c-953a83ab6fd0"
    )
    duplicate = "an identifier is held by another patient"
    by_ref = {line.pop("ref"): line for line in report_lines(report)}
    assert by_ref == {
        "patient-examples-general-excerpt.json:entry[0] id=1": {
            "status": "duplicate",
            "reason": duplicate,
            "existing_id": mom,
            "system": SSN,
        },
        "patient-genetics-example1.json id=genetics-example1": {
            "status": "duplicate",
            "reason": duplicate,
            "existing_id": mom,
            "system": SSN,
        },
        "patients-excerpt.csv:line 7 id=2482686d-4161-bad9-0805-c11fabe55cf4": {
            "status": "duplicate",
            "reason": duplicate,
            "existing_id": arline,
            "system": SSN,
        },
        "broken.ndjson:line 2": {
            "status": "rejected",
            "reason": "is not valid JSON: Expecting value (column 18)",
        },
        "broken.ndjson:line 3 id=obs-1": {
            "status": "rejected",
            "reason": "is not a Patient (Observation)",
        },
        "broken.ndjson:line 1 id=bad-1": {
            "status": "rejected",
            "reason": "not a valid R4 Patient",
            "errors": {"gender": ["must be one of male, female, other, unknown"]},
        },
    }
    assert (summary.files, summary.records, summary.skipped) == (10, 24, 2)
    assert (summary.created, summary.duplicates, summary.rejected) == (16, 3, 3)
    assert stored_count(db) == 16


def test_unreachable_broker_stops_the_import_with_exit_2_and_one_line(tmp_path, capsys):
    path = config_file(tmp_path, {"AMQP_URI": "amqp://guest:guest@127.0.0.1:1/"})
    report = tmp_path / "report.jsonl"

    code = importer.main(["--config", str(path), "--report", str(report), str(DATA)])

    err = capsys.readouterr().err
    assert code == 2
    assert err.strip().splitlines()[-1] == (
        "import stopped: cannot reach the broker at 127.0.0.1:1"
        " (ConnectionRefusedError)"
    )
    assert "Traceback" not in err
    assert not report.exists()


class FailingCluster:
    """A cluster proxy whose patient_service raises ``error`` from
    ``method``."""

    method, error = None, None

    def __init__(self, config, timeout):
        self.patient_service = self

    def start(self):
        return self

    def stop(self):
        pass

    def ping(self):
        self.fail_if("ping")
        return "pong"

    @property
    def register_patients(self):
        return self

    def call_async(self, entries):
        # The answer is awaited later: the error comes with it.
        return FailingReply(self, len(entries))

    def fail_if(self, method):
        if method == self.method:
            raise self.error


class FailingReply:
    def __init__(self, cluster, count):
        self.cluster, self.count = cluster, count

    def result(self):
        self.cluster.fail_if("register_patients")
        return [{"status": "created"}] * self.count


@pytest.mark.parametrize(
    "method, error, code, message",
    [
        (
            "ping",
            UnknownService("patient_service"),
            2,
            "the patient service is not running (no one serves patient_service)",
        ),
        (
            "register_patients",
            RpcTimeout(5),
            2,
            "the patient service did not answer within 5 s,"
            " after reading 3 records; run it again to go on",
        ),
        (
            "register_patients",
            InternalError("4f2a9c"),
            1,
            "the patient service failed (internal error, reference 4f2a9c),"
            " after reading 3 records; run it again to go on",
        ),
    ],
)
def test_service_failure_stops_the_import_with_one_line(
    tmp_path, capsys, monkeypatch, method, error, code, message
):
    monkeypatch.setattr(FailingCluster, "method", method)
    monkeypatch.setattr(FailingCluster, "error", error)
    monkeypatch.setattr(importer, "ClusterRpcProxy", FailingCluster)
    args = ["--config", str(config_file(tmp_path, {"AMQP_URI": "amqp://x/"}))]
    args += ["--timeout", "5", "--batch-size", "2", "--report", str(tmp_path / "r")]

    exit_code = importer.main([*args, str(DATA / "Patient-excerpt.ndjson")])

    assert exit_code == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"import stopped: {message}"
    )


def test_command_runs_as_a_module(service, config, db, tmp_path):
    report = tmp_path / "report.jsonl"
    args = ["--config", str(config_file(tmp_path, config)), "--report", str(report)]

    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "patient.importer",
            *args,
            str(DATA / "patient-example-mom.json"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert re.search(r"created +1\n", done.stdout)
    assert stored_count(db) == 1


def test_importing_the_shared_data_twice_stores_each_patient_once(
    service, config, db, tmp_path, capsys
):
    expected = predicted_outcomes(SHARED_DATA)
    first_report = tmp_path / "first.jsonl"
    args = ["--config", str(config_file(tmp_path, config))]
    args += ["--report", str(first_report), "--batch-size", "100", str(SHARED_DATA)]

    assert importer.main(args) == 0

    console = capsys.readouterr()
    first = summary_from(console.out)
    assert first == expected
    assert sum(first[label] for label in SUMMARY_LABELS[2:]) == first["records read"]
    assert stored_count(db) == first["created"]
    check_report(first_report, first)
    check_known_quirks(db, first_report)
    check_no_family_names(db, console.out + console.err)

    second = importer.run_import(
        [SHARED_DATA], config, tmp_path / "second.jsonl", batch_size=100
    )

    assert second.created == 0
    assert second.replayed == first["created"]
    assert (second.records, second.duplicates, second.rejected) == (
        first["records read"],
        first["duplicates"],
        first["rejected"],
    )
    assert stored_count(db) == first["created"]


def summary_from(out):
    counts = {}
    for line in out.splitlines():
        match = re.fullmatch(r"\s*([a-z ]+?) +(\d+)( .*)?", line)
        if match:
            counts[match[1]] = int(match[2])
    return counts


def predicted_outcomes(root):
    """The summary the service's rules predict, worked out from the files
    (Synthea rows through the mapping that test_sources checks): in reading
    order, a valid Patient is stored unless a stored patient holds one of its
    identifiers (system and value), and the same content again is already
    imported."""
    counts = dict.fromkeys(SUMMARY_LABELS, 0)
    held, contents = set(), set()
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".json", ".ndjson", ".csv"):
            continue
        counts["files read"] += 1
        for resource in raw_resources(path):
            counts["records read"] += 1
            counts[outcome(resource, held, contents)] += 1
    return counts


def raw_resources(path):
    if path.suffix == ".csv":
        with open(path, newline="") as file:
            yield from map(sources.synthea_patient, csv.DictReader(file))
    elif path.suffix == ".ndjson":
        yield from map(json.loads, path.read_text().splitlines())
    else:
        data = json.loads(path.read_text())
        if data["resourceType"] == "Bundle":
            yield from (entry["resource"] for entry in data["entry"])
        else:
            yield data


def outcome(resource, held, contents):
    if resource["resourceType"] != "Patient":
        return "skipped"
    try:
        validate_patient(resource)
    except InvalidPatient:
        return "rejected"
    content = json.dumps(resource, sort_keys=True)
    if content in contents:
        return "already imported"
    identifiers = {
        (i["system"], i["value"])
        for i in resource.get("identifier", [])
        if i.get("system") and i.get("value")
    }
    if identifiers & held:
        return "duplicates"
    held.update(identifiers)
    contents.add(content)
    return "created"


def check_report(path, summary):
    lines = report_lines(path)
    statuses = collections.Counter(line["status"] for line in lines)
    assert statuses["duplicate"] == summary["duplicates"]
    assert statuses["rejected"] == summary["rejected"]
    assert len(lines) == summary["duplicates"] + summary["rejected"]
    for line in lines:
        assert line["reason"]
        if line["status"] == "duplicate":
            assert line["existing_id"] and line["system"]


def check_known_quirks(db, report_path):
    by_ref = {line["ref"]: line for line in report_lines(report_path)}

    # The woman with SSN 444222222 under three resource ids.
    mom = holder_of(db, SSN, "444222222")
    same_woman = [
        "fhir-r4/patient-example-mom.json id=mom",
        "fhir-r4/patient-examples-general.json:entry[0] id=1",
        "fhir-r4/patient-genetics-example1.json id=genetics-example1",
    ]
    others = [by_ref[ref] for ref in same_woman if ref in by_ref]
    assert [line["existing_id"] for line in others] == [mom, mom]

    # Two people sharing an SSN in patients.csv: the later one is refused.
    sharing = shared_ssn_rows(SHARED_DATA / "synthea" / "patients.csv")
    first_id = holder_of(db, sources.SYNTHEA_SYSTEM, sharing[0]["Id"])
    assert holder_of(db, SSN, sharing[0]["SSN"]) == first_id
    [refused] = [line for ref, line in by_ref.items() if sharing[1]["Id"] in ref]
    assert (refused["status"], refused["existing_id"]) == ("duplicate", first_id)

    # Pieter's second identifier has a system and no value.
    pieter = holder_of(db, DUTCH_BSN, "738472983")
    valueless = db.execute(
        select(PatientIdentifier.system).where(
            PatientIdentifier.patient_id == pieter, PatientIdentifier.value.is_(None)
        )
    ).scalars()
    assert list(valueless) == [DUTCH_BSN]

    # Patients without a name are stored.
    stored = db.execute(select(Patient.resource)).scalars().all()
    nameless = [r for r in stored if "name" not in r]
    assert len(nameless) == count_nameless(SHARED_DATA) > 0


def shared_ssn_rows(path):
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    ssns = collections.Counter(row["SSN"] for row in rows)
    return [row for row in rows if ssns[row["SSN"]] > 1]


def count_nameless(root):
    return sum(
        1
        for path in root.rglob("*")
        if path.suffix in (".json", ".ndjson", ".csv")
        for resource in raw_resources(path)
        if resource["resourceType"] == "Patient" and "name" not in resource
    )


def check_no_family_names(db, console):
    db.rollback()
    families = {
        name["family"]
        for resource in db.execute(select(Patient.resource)).scalars()
        for name in resource.get("name", [])
        if name.get("family")
    }
    assert families
    shown = [f for f in families if re.search(rf"\b{re.escape(f)}\b", console)]
    assert not shown


def test_batches_in_flight_never_share_an_identifier_or_a_key():
    def entry(key, *identifiers):
        resource = {
            "resourceType": "Patient",
            "identifier": [{"system": s, "value": v} for s, v in identifiers]
            + ["not an identifier", {"system": {"nested": 1}, "value": "x"}],
        }
        return {"resource": resource, "idempotency_key": key}

    first = importer._claims([entry("k1", ("urn:a", "1"))])
    same_identifier = importer._claims([entry("k2", ("urn:a", "1"))])
    same_key = importer._claims([entry("k1", ("urn:b", "2"))])
    unrelated = importer._claims([entry("k3", ("urn:a", "2"), ("urn:b", "1"))])

    assert first & same_identifier
    assert first & same_key
    assert not first & unrelated
