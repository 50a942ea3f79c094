"""The official-output fixtures travel with the repository: a clone with nothing beside it runs the tests.

.ci/run runs the README's test command from a fresh clone with NEON_FIXTURES unset; these checks make sure
that what it then reads is inside the clone: the default fixture folder is in the repository, every file in
it is tracked by git (so a clone has it), and no test or CI file reaches outside the repository for it.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import DEFAULT_FIXTURES, REPO, fixtures_root

FAMILIES = ("edm", "imm", "var", "xar", "dinov2")   # families, and the DINOv2 detector


def test_default_fixture_root_is_inside_the_repository(monkeypatch):
    monkeypatch.delenv("NEON_FIXTURES", raising=False)
    root = fixtures_root()
    assert root == DEFAULT_FIXTURES.resolve() and root.is_relative_to(REPO)
    for family in FAMILIES:
        assert (root / family / "README.md").is_file(), f"{family}/ has no README"


def test_neon_fixtures_still_overrides_the_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("NEON_FIXTURES", str(tmp_path))
    assert fixtures_root() == tmp_path.resolve()


def test_no_test_or_ci_file_reads_fixtures_from_outside_the_repository():
    outside = re.compile(r"\.\./shared|parent\s*/\s*[\"']shared[\"']|shared/fixtures")
    files = [p for p in (REPO / "tests").glob("*.py") if p.name != Path(__file__).name]   # not this pattern
    files += [REPO / ".ci" / "run", REPO / "pyproject.toml", REPO / "scripts" / "setup.sh"]
    offenders = [p.name for p in files if outside.search(p.read_text())]
    assert not offenders


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
def test_every_default_fixture_file_is_tracked_by_git():
    files = sorted(str(p.relative_to(REPO)) for p in DEFAULT_FIXTURES.rglob("*") if p.is_file())
    assert files
    tracked = subprocess.run(["git", "ls-files", "--", *files], cwd=REPO, capture_output=True, text=True,
                             check=True, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"}).stdout.split()
    assert sorted(tracked) == files, sorted(set(files) - set(tracked))
