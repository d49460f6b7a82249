"""Strings the service can store: no control characters but tab, CR and LF
(FHIR forbids them; PostgreSQL refuses NUL) and no unpaired surrogates
(they cannot be encoded)."""

import re

_UNSAFE = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff]")

UNSAFE_MESSAGE = "contains a control character or an unpaired surrogate"


def is_unsafe(value):
    return bool(_UNSAFE.search(value))
