"""schemathesis against the live /openapi.json, with a valid token: no
server error, and no response the document does not describe."""

import os
import subprocess

from tests.factories import patient
from tests.http_client import token
from tests.test_http import register

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fuzzing_the_documented_api_finds_no_server_error_nor_undocumented_answer(
    api, api_base, tmp_path
):
    for _ in range(3):
        register(api, patient())

    result = subprocess.run(
        [
            os.path.join(ROOT, "scripts", "fuzz-http"),
            api_base,
            "--seed",
            "20261204",
            "--report",
            "ndjson",
            "--report-dir",
            str(tmp_path),
        ],
        env={
            **os.environ,
            "API_TOKEN": token("admin", sub="fuzzer", ttl_s=600),
            "FUZZ_EXAMPLES": "15",
        },
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
