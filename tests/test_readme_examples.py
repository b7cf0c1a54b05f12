"""The README's curl examples, run as written against the real service (marked blocks only)."""

from __future__ import annotations

import json
import os
import re
import subprocess

import pytest

from tests.conftest import ADMIN_KEY, REPO_ROOT, shared

MARKER = "tests/test_readme_examples.py runs every curl line of the next block against a real service"
DEMO_MODELS = "with the three demo models"


def readme_curl_lines(demo_models: bool) -> list[str]:
    """curl lines of the marked blocks; ``demo_models`` picks the blocks marked for the three-model demo service."""
    text = (REPO_ROOT / "README.md").read_text()
    lines = []
    for marker_rest, block in re.findall(re.escape(MARKER) + r"(.*?)\n```bash\n(.*?)```", text, flags=re.S):
        if (DEMO_MODELS in marker_rest) == demo_models:
            lines += [line for line in block.splitlines() if line.startswith("curl ")]
    return lines


def test_the_readme_has_tested_examples() -> None:
    assert len(readme_curl_lines(False)) >= 10 and len(readme_curl_lines(True)) >= 3


def _run(url: str, line: str) -> None:
    shared("blood-photos")  # the examples post real photographs from ../shared/data
    env = dict(os.environ, MEDCL_URL=url, MEDCL_API_KEY=ADMIN_KEY)
    out = subprocess.run(["bash", "-c", "set -o pipefail; " + line], cwd=REPO_ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    if not line.rstrip().endswith(("/metrics", "/readyz")):
        json.loads(out.stdout)  # every API answer is JSON


@pytest.mark.parametrize("line", readme_curl_lines(False), ids=lambda line: line.split("$MEDCL_URL")[-1][:40])
def test_readme_curl_example(service_url: str, line: str) -> None:
    _run(service_url, line)


@pytest.mark.parametrize("line", readme_curl_lines(True), ids=lambda line: line.split("$MEDCL_URL")[-1][:40])
def test_readme_demo_models_example(demo_models_service: str, line: str) -> None:
    _run(demo_models_service, line)
