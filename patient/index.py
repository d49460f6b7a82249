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
# The name search parameters and the parts of a name each one looks in.
NAME_SEARCH_PARTS = {
    "name": NAME_PARTS,
    "family": ("family",),
    "given": ("given",),
}
MAX_TOKEN_CHARS = 200
# Every token's first one to PREFIX_CHARS characters are kept per search
# parameter, one row per patient: a short prefix, which matches many
# patients, is then read in patient order from one index range, and the
# planner knows how many it matches. Longer prefixes match few.
PREFIX_CHARS = 5

# Kana voicing marks change the sound, not an accent: they stay.
_KEPT_MARKS = {"\u3099", "\u309a"}
# Latin letters that carry their stroke or ligature in the letter itself, so
# that Unicode decomposition leaves them as they are; and the apostrophes a
# keyboard or a phone may type for "'".
_LATIN_LETTERS = str.maketrans(
    {"ł": "l", "ø": "o", "đ": "d", "ħ": "h", "ı": "i", "æ": "ae", "œ": "oe", "þ": "th"}
    | dict.fromkeys("’‘ʼ`´", "'")
)
_WORD_BREAK = re.compile(r"[\s\-‐‑‒–—―−]+")
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
    name_prefixes: list = field(default_factory=list)  # (parameter, prefix)
    telecoms: list = field(default_factory=list)  # (system, key)


def search_keys(resource, default_region=None):
    birth = date_range(resource["birthDate"]) if "birthDate" in resource else None
    tokens = name_tokens(resource)
    return SearchKeys(
        active=resource.get("active", True) is not False,
        gender=resource.get("gender"),
        birth_date_start=birth[0] if birth else None,
        birth_date_end=birth[1] if birth else None,
        identifiers=identifier_keys(resource),
        name_tokens=tokens,
        name_prefixes=name_prefixes(tokens),
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
    """A search string folded as names are: dashes of every kind are spaces,
    and spacing is single."""
    return " ".join(_WORD_BREAK.sub(" ", fold(text)).split())


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


def name_prefixes(tokens):
    """(parameter, prefix) for each name search parameter a token answers,
    each prefix of one to PREFIX_CHARS characters once."""
    found = {}
    for part, token in tokens:
        for parameter, parts in NAME_SEARCH_PARTS.items():
            if part in parts:
                for end in range(1, min(len(token), PREFIX_CHARS) + 1):
                    found.setdefault((parameter, token[:end]), None)
    return list(found)


def _tokens(value):
    """The whole folded value, each word of it, and each without punctuation
    or spaces: "van de Heuvel" is found by "van de h", "heu" and "vandeh";
    "O'Brien" by "o'b" and "obr"; "Smith‐Jones" by "smith-jones"."""
    whole = fold_query(value)
    if not whole:
        return []
    found = dict.fromkeys([whole, *whole.split(" ")])
    for token in list(found):
        bare = _PUNCTUATION.sub("", token).replace(" ", "")
        if bare:
            found.setdefault(bare)
        if _CJK.search(token) and len(token) <= MAX_CJK_TAILS:
            for start in range(1, len(token)):
                found.setdefault(token[start:])
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


def phone_keys(value, region=None):
    """Keys under which a stored phone number is found.

    A number with its country code ("+61 3 5555 6473") is keyed by its
    E.164 form ("e") and by its national number ("m", for searches written
    without a country code); a number without one that is valid in the
    service's region, by its E.164 form. Any other number could be of any
    country: it is keyed by its digits less trunk zeros ("n": "(03) 5555
    6473" as 355556473), which a search with a country code also looks for.
    """
    number = _parse(value, None)
    if number is not None:
        national = phonenumbers.national_significant_number(number)
        return [_e164(number), "m" + national]
    number = _parse(value, region, valid=True)
    if number is not None:
        return [_e164(number)]
    national = _national_digits(value)
    return ["n" + national] if national else []


def phone_search_keys(value, region=None):
    """Keys that find a searched number however the stored one was written.
    A number with a country code never finds one of another country; one
    without finds that number in any country."""
    number = _parse(value, None)
    if number is not None:
        national = phonenumbers.national_significant_number(number)
        return [_e164(number), "n" + national]
    keys = {}
    national = _national_digits(value)
    if national:
        keys["n" + national] = None
        keys["m" + national] = None
    number = _parse(value, region)
    if number is not None:
        keys[_e164(number)] = None
    return list(keys)


def _parse(value, region, valid=False):
    try:
        number = phonenumbers.parse(value, region)
    except phonenumbers.NumberParseException:
        return None
    if valid:
        return number if phonenumbers.is_valid_number(number) else None
    return number if phonenumbers.is_possible_number(number) else None


def _e164(number):
    return "e" + phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def _national_digits(value):
    digits = re.sub(r"\D", "", value)
    return (digits.lstrip("0") or digits)[:30] if digits else None
