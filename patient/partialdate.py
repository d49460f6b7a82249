"""FHIR dates that may be partial ("1974", "1974-12", "1974-12-25"), as the
first and last day they cover."""

import calendar
import re
from datetime import date

_DATE = re.compile(r"^(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?$")


def date_range(text):
    """(first day, last day) of a FHIR date; ValueError if it is not one."""
    match = _DATE.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError("not a FHIR date")
    year, month, day = match.groups()
    year = int(year)
    if month is None:
        return date(year, 1, 1), date(year, 12, 31)
    month = int(month)
    if day is None:
        last = calendar.monthrange(year, month)[1]
        return date(year, month, 1), date(year, month, last)
    exact = date(year, month, int(day))
    return exact, exact
