"""HTTP to the running service: tokens as the gateway issues them, and a
client that signs its requests with them."""

import socket
import uuid

import requests

from patient.auth import issue_token

TOKEN_SETTINGS = {
    "JWT_ALGORITHM": "HS256",
    "JWT_SECRET": f"test-secret-{uuid.uuid4().hex}{uuid.uuid4().hex}",
    "JWT_AUDIENCE": "patient-service",
    "JWT_ISSUER": "api-gateway",
}


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token(*roles, sub="user-1", patient_id=None, ttl_s=300, **overrides):
    config = {**TOKEN_SETTINGS, **overrides}
    return issue_token(
        config["JWT_SECRET"], sub, roles, patient_id, ttl_s, config=config
    )


class ApiClient:
    """``requests`` against the service, as ``role`` unless told otherwise."""

    def __init__(self, base, timeout=30):
        self.base = base
        self.timeout = timeout
        self.session = requests.Session()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.session.close()

    def request(self, method, path, as_=None, headers=None, **kwargs):
        headers = dict(headers or {})
        if as_ is not None:
            headers["Authorization"] = f"Bearer {as_}"
        return self.session.request(
            method, self.base + path, headers=headers, timeout=self.timeout, **kwargs
        )

    def get(self, path, **kwargs):
        return self.request("GET", path, **kwargs)

    def post(self, path, **kwargs):
        return self.request("POST", path, **kwargs)

    def put(self, path, **kwargs):
        return self.request("PUT", path, **kwargs)
