"""Property-based fuzzing of the live server from its own OpenAPI schema: no 5xx, ever."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.conftest import need
from tests.e2e.conftest import LiveServer

MAX_EXAMPLES = 25


def _schemathesis() -> list[str]:
    exe = Path(sys.executable).with_name("schemathesis")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("schemathesis")
    need(found, "schemathesis is not installed (pip install 'lipsync-server[test]')")
    return [found]


@pytest.mark.slow
def test_no_server_errors_from_generated_requests(server_factory, tmp_path) -> None:
    server: LiveServer = server_factory()  # the classic engine, as shipped
    report = tmp_path / "st.json"
    cmd = [
        *_schemathesis(),
        "run",
        f"{server.url}/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--phases",
        "examples,coverage,fuzzing",
        "--workers",
        "1",
        "--seed",
        "7",
        "--no-shrink",
        "--request-timeout",
        "120",
        "--suppress-health-check",
        "all",
        "--report",
        "json",
        "--report-json-path",
        str(report),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    stats = httpx.get(f"{server.url}/stats", timeout=30).json()
    assert "internal_error" not in stats["requests"]["failed_by_reason"], stats
    assert stats["requests"]["served"] + stats["requests"]["failed"] > 0
    assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
