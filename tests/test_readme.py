"""The README's command-line examples run as written (the long-running `demo` server is
covered by tests/test_app.py and tests/test_browser.py)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = [line.split("#", 1)[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
            if re.match(r"^\s+\.venv/bin/tessera\b", line)]


def test_the_readme_shows_the_cli() -> None:
    assert any(e.endswith("tessera demo") for e in EXAMPLES) and len(EXAMPLES) >= 4


@pytest.mark.parametrize("example", [e for e in EXAMPLES if shlex.split(e)[1:2] != ["demo"]])
def test_readme_example_runs(example: str) -> None:
    args = shlex.split(example)[1:]
    done = subprocess.run([sys.executable, "-m", "tessera.apps.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"{example}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert done.stdout.strip()
