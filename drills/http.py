"""The service's HTTP API as the drills see it: a token as the gateway
issues it, and calls that record their status, problem code and time."""

import secrets
import time

import eventlet
import requests

from patient.auth import issue_token

SECRET = secrets.token_urlsafe(48)
SETTINGS = {"JWT_ALGORITHM": "HS256", "JWT_SECRET": SECRET}


class Http:
    def __init__(self, port, timeout=10.0):
        self.base = f"http://127.0.0.1:{port}"
        self.timeout = timeout
        self.token = issue_token(SECRET, "drill", ["clinician"], config=SETTINGS)

    def call(self, method, path, **kw):
        """(status or the error's name, problem code, seconds)."""
        headers = {"Authorization": f"Bearer {self.token}", **kw.pop("headers", {})}
        started = time.monotonic()
        try:
            answer = requests.request(
                method, self.base + path, headers=headers, timeout=self.timeout, **kw
            )
        except requests.RequestException as exc:
            return type(exc).__name__, None, time.monotonic() - started
        took = time.monotonic() - started
        code = None
        if answer.headers.get("content-type", "").startswith("application/problem"):
            code = answer.json().get("code")
        return answer.status_code, code, took


BIG = b"x" * (20 * 1024 * 1024)
JSON = {"Content-Type": "application/json"}
# (kind, request, the answer expected)
MALFORMED = (
    (
        "bad JSON",
        {"data": b'{"resourceType": "Pat', "headers": JSON},
        "400 invalid-request",
    ),
    (
        "wrong field names",
        {"json": {"resourceType": "Patient", "nmae": [{"family": "Drill"}]}},
        "400 invalid-patient",
    ),
    ("20 MB body", {"data": BIG, "headers": JSON}, "413 payload-too-large"),
)


def flood(api, bad_json=100, wrong_fields=100, big=3, concurrency=10):
    """Malformed registrations over HTTP: per kind, the answers counted, and
    whether every one was the answer expected."""
    counts = {
        "bad JSON": bad_json,
        "wrong field names": wrong_fields,
        "20 MB body": big,
    }
    jobs = [
        (kind, request, expected)
        for kind, request, expected in MALFORMED
        for _ in range(counts[kind])
    ]

    def send(job):
        kind, request, expected = job
        status, code, _ = api.call("POST", "/patients", **request)
        return kind, f"{status} {code}", expected

    summary, all_expected = {}, True
    for kind, answer, expected in eventlet.GreenPool(concurrency).imap(send, jobs):
        answers = summary.setdefault(kind, {})
        answers[answer] = answers.get(answer, 0) + 1
        all_expected &= answer == expected
    return summary, all_expected
