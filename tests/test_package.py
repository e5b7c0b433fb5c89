"""The package itself: namespace layout, light imports, pinned dependencies, CI wiring."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("core", "modalities", "llm", "pipelines", "apps")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_every_subpackage_is_listed_for_installation() -> None:
    """A folder with __init__.py under a top-level package must be in pyproject's
    `packages`, or a non-editable install silently leaves it out."""
    listed = set(_pyproject()["tool"]["setuptools"]["packages"])
    found = {"tessera"}
    for top in TOP:
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT)
            if "__pycache__" in rel.parts:
                continue
            found.add(".".join(("tessera", *rel.parts)))
    assert found - listed == set(), f"add these to [tool.setuptools] packages: {sorted(found - listed)}"
    assert listed - found == set(), f"listed but missing on disk: {sorted(listed - found)}"


def test_nothing_installs_as_a_bare_top_level_package() -> None:
    pkgs = _pyproject()["tool"]["setuptools"]["packages"]
    assert all(p == "tessera" or p.startswith("tessera.") for p in pkgs)


def test_torch_and_torchaudio_are_pinned() -> None:
    deps = _pyproject()["project"]["dependencies"]
    assert "torch==2.11.0" in deps and "torchaudio==2.11.0" in deps


def test_importing_core_stays_light() -> None:
    code = (
        "import sys, tessera, tessera.core, tessera.core.spec, tessera.core.registry, "
        "tessera.core.checkpoint, tessera.core.training, tessera.core.quantizers, tessera.core.vocab, "
        "tessera.core.document, tessera.core.grammar, tessera.core.text, tessera.core.metrics;"
        "heavy = [m for m in ('gradio', 'deepspeed', 'trimesh', 'transformers') if m in sys.modules];"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "", f"importing tessera.core pulled in: {out.stdout.strip()}"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^\s*make test\b", readme, re.M), "README must show the test command `make test`"
    assert re.search(r"^make test\s*$", ci, re.M), ".ci/run must call exactly the README's test command"
