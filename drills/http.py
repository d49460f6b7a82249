"""The service's HTTP API as the drills see it: a token as the gateway
issues it, and calls that record their status, problem code and time."""

import secrets
import time

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
