"""The OpenAPI document tells the truth: schemathesis, every check, against a real server with API keys.

It generates requests from `/openapi.json` (examples, boundary values, fuzzing; valid and invalid data) and
checks each answer against the document: status codes, content types, response schemas and headers, that
schema-valid data is accepted and invalid data refused, that requests without a valid key are refused,
that undocumented methods get 405, and that nothing is a 5xx. A fixed seed and a bounded example count
keep it to a minute or two; the configuration and its one exception are in data/schemathesis.toml.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.serve_load import Server, free_port
from bench.standin import write_model

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).parent / "data" / "schemathesis.toml"
KEY = "conformance-0123456789"


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("models")
    write_model(root, "tiny", "1", seed=0, hidden=(), latent=4)
    port = free_port()
    env = {
        **os.environ,
        "MODEL_DIR": str(root),
        "PORT": str(port),
        "API_KEYS": f"ci:{KEY}",
        "MAX_BATCH": "8",
        "MAX_SAMPLES": "64",
        "MAX_QUEUE_ROWS": "4096",
        "PARSE_WORKERS": "0",
        "ACCESS_LOG": "false",
    }
    server = Server([sys.executable, "-m", "service"], env, None, root / "server.log")
    url = f"http://127.0.0.1:{port}"
    try:
        server.wait_ready(f"{url}/readyz")
        yield url
    finally:
        server.stop()


def test_every_schemathesis_check_passes_on_the_v1_document(server_url: str, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    assert st, "schemathesis' `st` is missing: it is in the dev extra"
    command = [
        st,
        "--config-file",
        str(CONFIG),
        "run",
        f"{server_url}/openapi.json",
        "--checks",
        "all",
        "--mode",
        "all",
        "--max-examples",
        "25",
        "--seed",
        "1",
        "--exclude-path-regex",
        "^/v2",  # the V2 routes are tested against the protocol's own document (test_v2)
        "-H",
        f"X-API-Key: {KEY}",
    ]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-2000:]
