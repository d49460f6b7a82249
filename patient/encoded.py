"""JSON documents passed through as PostgreSQL wrote them.

A page of search results is twenty resources of one to two kilobytes each:
decoding them from the database and encoding them again into the answer
cost the service more than the query did. A resource read as text stays
``EncodedJson`` and is embedded in the answer as it is.
"""

import json
import uuid


class EncodedJson(str):
    """One JSON document, already encoded."""

    def decoded(self):
        return json.loads(self)


def embed(value, dumps):
    """``dumps(value)``, with each ``EncodedJson`` in ``value`` embedded as
    it is. Looks in ``value`` itself, its values or items, and theirs: where
    this service's answers hold them."""
    found = []
    marker = uuid.uuid4().hex

    def hold(document):
        found.append(document)
        return f"\x00{marker}:{len(found) - 1}\x00"

    held = _swap(value, hold, depth=3)
    if not found:
        return dumps(value)
    encoded = dumps(held)
    # A held document's string, as any JSON encoder writes it (control
    # characters escaped, so no text of the answer's own can match).
    pattern = json.dumps(f"\x00{marker}:")[:-1]
    for index, document in enumerate(found):
        encoded = encoded.replace(f'{pattern}{index}\\u0000"', document, 1)
    return encoded


def decode_all(value):
    """``value`` with each ``EncodedJson`` in it decoded, for an answer in
    another encoding than JSON."""
    return _swap(value, EncodedJson.decoded, depth=3)


def _swap(value, swap, depth):
    if isinstance(value, EncodedJson):
        return swap(value)
    if depth == 0:
        return value
    if isinstance(value, dict):
        return {key: _swap(item, swap, depth - 1) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_swap(item, swap, depth - 1) for item in value]
    return value
