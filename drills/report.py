"""docs/resilience.md's table of results, kept in docs/resilience.json so
that a run of some drills keeps the figures of the others."""

import json
from dataclasses import asdict

from drills.servers import ROOT

RESULTS = ROOT / "docs" / "resilience.json"
DOC = ROOT / "docs" / "resilience.md"
BEGIN = "<!-- drill results: written by python -m drills -->"
END = "<!-- end of drill results -->"


def record(results):
    stored = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for result in results:
        stored[result.drill] = asdict(result)
    RESULTS.write_text(json.dumps(dict(sorted(stored.items())), indent=1) + "\n")
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{BEGIN}\n{render(stored.values())}{END}{tail}")


def render(results):
    lines = [
        "| drill | calls sent | registrations acknowledged | found afterwards"
        " | duplicates | longest stall (s) | recovery (s) | passed | date |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        recovery = "-" if r["recovery"] is None else r["recovery"]
        passed = "yes" if not r["failures"] else "**no**"
        lines.append(
            f"| {r['drill']} | {r['sent']} | {r['acknowledged']} | {r['found']}"
            f" | {r['duplicates']} | {r['longest_stall']} | {recovery}"
            f" | {passed} | {r['date']} |"
        )
    lines.append("")
    for r in results:
        lines.append(f"**{r['drill']}**")
        lines.append("")
        for name, value in r["measured"].items():
            lines.append(f"- {name}: {_plain(value)}")
        lines.extend(f"- FAILED: {failure}" for failure in r["failures"])
        lines.append("")
    return "\n".join(lines)


def _plain(value):
    if isinstance(value, dict):
        return ", ".join(f"{k} {_plain(v)}" for k, v in value.items())
    if isinstance(value, list):
        return " / ".join(str(v) for v in value)
    return str(value)
