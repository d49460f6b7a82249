"""Who calls over HTTP, and what they may do.

Callers present a bearer token (a JWT) issued by the API gateway. The
algorithm and key come from configuration only, never from the token, and
``exp``, ``aud``, ``iss`` and ``sub`` are required. A token carries
``roles`` (``patient``, ``clinician``, ``admin``) and, for a patient,
``patient_id``: the one record that patient may reach.
"""

import argparse
import logging
import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from patient.caller import Caller
from patient.errors import PatientNotFound
from patient.problems import AuthNotConfigured, Forbidden, Unauthenticated

log = logging.getLogger(__name__)

ALGORITHMS = ("HS256", "RS256")
# RFC 7518 asks for an HMAC key at least as long as the hash.
MIN_SECRET_BYTES = 32
MAX_TOKEN_CHARS = 4096
# The gateway's clock may run a little ahead or behind: a token issued "in
# the future" by a few seconds is good, one expired this long ago is not.
CLOCK_SKEW_S = 30
GATEWAY = "gateway"
DEFAULT_AUDIENCE = "patient-service"
DEFAULT_ISSUER = "api-gateway"

PATIENT, CLINICIAN, ADMIN = "patient", "clinician", "admin"
ROLES = (PATIENT, CLINICIAN, ADMIN)
STAFF = frozenset({CLINICIAN, ADMIN})

# Who may do what. A caller with no staff role reaches only the record
# named by the token's patient_id.
MAY = {
    "search": {PATIENT, CLINICIAN, ADMIN},
    "register": {CLINICIAN, ADMIN},
    "read": {PATIENT, CLINICIAN, ADMIN},
    "update": {PATIENT, CLINICIAN, ADMIN},
    "deactivate": {ADMIN},
    "request-appointment": {PATIENT, CLINICIAN, ADMIN},
    "read-appointments": {PATIENT, CLINICIAN, ADMIN},
    "cancel-appointment": {PATIENT, CLINICIAN, ADMIN},
}

_SUBJECT = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,200}")


@dataclass(frozen=True)
class Principal:
    subject: str
    roles: frozenset
    patient_id: str | None = None

    @property
    def own_record_only(self):
        return not self.roles & STAFF


class TokenVerifier:
    """Checks bearer tokens against the configured key.

    A missing or unusable key makes every protected route answer 503: an
    unsigned or unverifiable token is never accepted.
    """

    def __init__(self, config):
        self.algorithm = config.get("JWT_ALGORITHM") or "HS256"
        self.audience = config.get("JWT_AUDIENCE") or DEFAULT_AUDIENCE
        self.issuer = config.get("JWT_ISSUER") or DEFAULT_ISSUER
        self.key = _verification_key(self.algorithm, config)

    def principal(self, authorization):
        if self.key is None:
            raise AuthNotConfigured()
        token = _bearer_token(authorization)
        try:
            claims = jwt.decode(
                token,
                self.key,
                algorithms=[self.algorithm],
                audience=self.audience,
                issuer=self.issuer,
                leeway=CLOCK_SKEW_S,
                options={"require": ["exp", "aud", "iss", "sub"]},
            )
        except jwt.PyJWTError as exc:
            log.info("refused a token: %s", type(exc).__name__)
            raise Unauthenticated() from None
        return _principal(claims)


def _verification_key(algorithm, config):
    if algorithm not in ALGORITHMS:
        log.error("JWT_ALGORITHM must be one of %s", ", ".join(ALGORITHMS))
        return None
    if algorithm == "HS256":
        secret = str(config.get("JWT_SECRET") or "").encode()
        if len(secret) < MIN_SECRET_BYTES:
            log.error("JWT_SECRET is unset or under %s bytes", MIN_SECRET_BYTES)
            return None
        return secret
    pem = _pem(str(config.get("JWT_PUBLIC_KEY") or ""))
    try:
        key = load_pem_public_key(pem.encode())
    except (ValueError, TypeError) as exc:
        log.error("JWT_PUBLIC_KEY is not a PEM public key: %s", type(exc).__name__)
        return None
    if not isinstance(key, RSAPublicKey):
        log.error("JWT_PUBLIC_KEY is not an RSA key")
        return None
    return key


def _pem(value):
    """The key itself, or the path of a file holding it."""
    if value.lstrip().startswith("-----BEGIN") or not value:
        return value
    try:
        return Path(value).read_text()
    except OSError:
        return ""


def _bearer_token(authorization):
    scheme, _, token = (authorization or "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        raise Unauthenticated()
    return token


def _principal(claims):
    subject, roles = claims.get("sub"), claims.get("roles")
    if not isinstance(subject, str) or not _SUBJECT.fullmatch(subject):
        raise Unauthenticated("the token's sub is not a usable name")
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise Unauthenticated("the token's roles must be a list of names")
    known = frozenset(roles) & frozenset(ROLES)

    patient_id = claims.get("patient_id")
    if PATIENT in known:
        try:
            patient_id = str(uuid.UUID(patient_id))
        except (TypeError, ValueError, AttributeError):
            raise Unauthenticated("a patient's token must name a patient_id") from None
    else:
        patient_id = None
    return Principal(subject=subject, roles=known, patient_id=patient_id)


def authorize(principal, action):
    if not principal.roles & MAY[action]:
        raise Forbidden()


def check_own_record(principal, patient_id, missing=PatientNotFound):
    """A caller limited to their own record is told that any other record
    (or another patient's appointment request) does not exist."""
    if principal.own_record_only and not _same_id(principal.patient_id, patient_id):
        raise missing()


def restrict_search(principal, criteria):
    """A caller limited to their own record finds at most that record."""
    if not principal.own_record_only:
        return criteria
    given = criteria.get("_id", [])
    given = given if isinstance(given, list) else [given]
    return {**criteria, "_id": [*given, principal.patient_id]}


def caller(principal, call_id):
    return Caller(actor=principal.subject, service=GATEWAY, call_id=call_id)


def _same_id(one, other):
    try:
        return uuid.UUID(str(one)) == uuid.UUID(str(other)[:64])
    except ValueError:
        return False


def issue_token(key, subject, roles, patient_id=None, ttl_s=3600, config=None):
    """A token as the gateway would issue it: for development and tests."""
    config = config or {}
    now = int(time.time())
    claims = {
        "sub": subject,
        "roles": list(roles),
        "aud": config.get("JWT_AUDIENCE") or DEFAULT_AUDIENCE,
        "iss": config.get("JWT_ISSUER") or DEFAULT_ISSUER,
        "iat": now,
        "exp": now + ttl_s,
    }
    if patient_id is not None:
        claims["patient_id"] = patient_id
    return jwt.encode(claims, key, algorithm=config.get("JWT_ALGORITHM") or "HS256")


def main(argv=None):
    """Print a development token signed with JWT_SECRET, or with the RSA
    private key given by --private-key when JWT_ALGORITHM is RS256."""
    parser = argparse.ArgumentParser(prog="patient-token", description=main.__doc__)
    parser.add_argument("--sub", required=True)
    parser.add_argument("--role", action="append", choices=ROLES, required=True)
    parser.add_argument("--patient-id")
    parser.add_argument("--ttl", type=int, default=3600, help="seconds")
    parser.add_argument("--private-key", type=Path)
    args = parser.parse_args(argv)

    config = {k: v for k, v in os.environ.items() if k.startswith("JWT_")}
    if (config.get("JWT_ALGORITHM") or "HS256") == "RS256":
        if args.private_key is None:
            parser.error("RS256 needs --private-key")
        key = args.private_key.read_text()
    else:
        key = config.get("JWT_SECRET") or parser.error("set JWT_SECRET")
    token = issue_token(key, args.sub, args.role, args.patient_id, args.ttl, config)
    sys.stdout.write(token + "\n")


if __name__ == "__main__":
    main()
