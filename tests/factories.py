"""Patient resources for tests, built small and explicit."""

import itertools
import json
from pathlib import Path

_serial = itertools.count(1)
DATA = Path(__file__).resolve().parent / "data"


def patient(**elements):
    """A minimal valid Patient with a unique MRN, plus ``elements``."""
    number = next(_serial)
    resource = {
        "resourceType": "Patient",
        "identifier": [{"system": "urn:test:mrn", "value": f"MRN-{number:06d}"}],
        "name": [{"family": "Testperson", "given": [f"Case{number}"]}],
        "gender": "female",
        "birthDate": "1980-05-17",
    }
    resource.update(elements)
    return resource


def example(name="patient-example.json"):
    return json.loads((DATA / name).read_text())
