"""The tree is lint-clean: `ruff check .` with the rules in pyproject.toml ([tool.ruff]), as pre-commit runs it."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _ruff() -> list[str]:
    beside = Path(sys.executable).with_name("ruff")   # the venv's ruff (the test extras install it)
    found = str(beside) if beside.exists() else shutil.which("ruff")
    if found is None:
        pytest.fail("ruff is not installed (pip install -e '.[test]')")
    return [found]


def test_ruff_finds_nothing_in_the_tree():
    res = subprocess.run([*_ruff(), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
