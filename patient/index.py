"""Search keys derived from a Patient resource.

The service and anything that loads the tables in bulk (the benchmark seed)
use these functions, so a key is computed one way only.
"""

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import date

import phonenumbers

from patient.partialdate import date_range

NAME_PARTS = ("family", "given", "prefix", "suffix", "text")
MAX_TOKEN_CHARS = 200

# Kana voicing marks change the sound, not an accent: they stay.
_KEPT_MARKS = {"\u3099", "\u309a"}
# Latin letters that carry their stroke or ligature in the letter itself, so
# that Unicode decomposition leaves them as they are.
_LATIN_LETTERS = str.maketrans(
    {"ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"}
)
_WORD_BREAK = re.compile(r"[\s\-‐‑‒–—]+")
_PUNCTUATION = re.compile(r"[^\w\s]", re.UNICODE)
# Chinese, Japanese and Korean names are often written without spaces
# ("张无忌"): every tail of such a word is a token, so a given name is
# found as well as the family name in front of it.
_CJK = re.compile(
    r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]"
)
MAX_CJK_TAILS = 12


@dataclass
class SearchKeys:
    active: bool = True
    gender: str | None = None
    birth_date_start: date | None = None
    birth_date_end: date | None = None
    identifiers: list = field(default_factory=list)  # (system, value)
    name_tokens: list = field(default_factory=list)  # (part, token)
    telecoms: list = field(default_factory=list)  # (system, key)


def search_keys(resource, default_region=None):
    birth = date_range(resource["birthDate"]) if "birthDate" in resource else None
    return SearchKeys(
        active=resource.get("active", True) is not False,
        gender=resource.get("gender"),
        birth_date_start=birth[0] if birth else None,
        birth_date_end=birth[1] if birth else None,
        identifiers=identifier_keys(resource),
        name_tokens=name_tokens(resource),
        telecoms=telecom_keys(resource, default_region),
    )


def identifier_keys(resource):
    seen = {}
    for identifier in resource.get("identifier", ()):
        system, value = identifier.get("system"), identifier.get("value")
        if system is None and value is None:
            continue
        seen.setdefault((system, value), None)
    return list(seen)


def fold(text):
    """Case- and accent-free form of ``text``, in any script."""
    decomposed = unicodedata.normalize("NFKD", text)
    kept = "".join(
        c
        for c in decomposed
        if c in _KEPT_MARKS or unicodedata.category(c) not in ("Mn", "Me")
    )
    return unicodedata.normalize("NFKC", kept).casefold().translate(_LATIN_LETTERS)


def fold_query(text):
    """A search string folded as names are, with spacing made single."""
    return " ".join(fold(text).split())


def name_tokens(resource):
    tokens = {}
    for name in resource.get("name", ()):
        for part in NAME_PARTS:
            values = name.get(part)
            if values is None:
                continue
            for value in values if isinstance(values, list) else [values]:
                for token in _tokens(value):
                    tokens.setdefault((part, token), None)
    return list(tokens)


def _tokens(value):
    """The whole folded value, each word of it, and each without punctuation:
    "van de Heuvel" is found by "van de h" and by "heu"; "O'Brien" by "o'b"
    and by "obr"."""
    whole = fold_query(value)
    if not whole:
        return []
    words = [w for w in _WORD_BREAK.split(whole) if w]
    found = dict.fromkeys([whole, *words])
    for word in list(found):
        bare = _PUNCTUATION.sub("", word)
        if bare:
            found.setdefault(bare)
        if _CJK.search(word) and len(word) <= MAX_CJK_TAILS:
            for start in range(1, len(word)):
                found.setdefault(word[start:])
    return [token[:MAX_TOKEN_CHARS] for token in found]


def telecom_keys(resource, default_region=None):
    keys = {}
    for telecom in resource.get("telecom", ()):
        value = telecom.get("value")
        if not value:
            continue
        if telecom.get("system") == "email":
            keys.setdefault(("email", email_key(value)), None)
        elif telecom.get("system") in ("phone", "sms", "fax", None):
            for key in phone_keys(value, default_region):
                keys.setdefault(("phone", key), None)
    return list(keys)


def email_key(value):
    return value.strip().casefold()[:MAX_TOKEN_CHARS]


def phone_keys(value, default_region=None):
    """Keys under which a phone number is stored and searched.

    A number written "(03) 5555 6473" and one written "+61 3 5555 6473"
    share the national significant number 355556473. Without a country code
    or a region that can parse the number, the digits less their trunk
    zeros stand in for it.
    """
    digits = re.sub(r"\D", "", value)
    if not digits:
        return []
    keys = {digits.lstrip("0") or digits: None}
    for region in (None, default_region):
        try:
            number = phonenumbers.parse(value, region)
        except phonenumbers.NumberParseException:
            continue
        keys.setdefault(phonenumbers.national_significant_number(number), None)
    return [key[:32] for key in keys]
