"""A new family needs its package, one entry point and one config: a throw-away family installed only through a
temporary package and its .dist-info entry point runs `neon run --smoke` with no edit anywhere else."""
import json
import os
import re
import subprocess
import sys

import yaml

from conftest import REPO

PACKAGE = '''
"""A throw-away family: the tiny test family under another name, found only through its entry point."""
from neon.testing import TinyPixFamily


class ThrowawayFamily(TinyPixFamily):
    name = "throwaway"
'''


def _install(root, name: str) -> None:
    """A package and the .dist-info an installer would write for it, entry point included."""
    (root / "throwaway_family").mkdir()
    (root / "throwaway_family" / "__init__.py").write_text(PACKAGE)
    info = root / "throwaway_family-0.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: throwaway-family\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(f"[neon.families]\n{name} = throwaway_family:ThrowawayFamily\n")


def _config() -> dict:
    """The worked example's config from docs/adding_a_family.md, for the throw-away family."""
    block = re.search(r"```yaml\n(.*?)```", (REPO / "docs" / "adding_a_family.md").read_text(), re.S).group(1)
    return {**yaml.safe_load(block), "family": "throwaway"}


def test_a_family_from_an_entry_point_runs_every_stage_with_no_other_edit(tmp_path):
    _install(tmp_path, "throwaway")
    config = tmp_path / "throwaway.yaml"
    config.write_text(yaml.safe_dump(_config()))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    listed = subprocess.run([sys.executable, "-c", "from neon.family import available; print(available())"],
                            env=env, capture_output=True, text=True, cwd=tmp_path)
    assert "'throwaway'" in listed.stdout, listed.stderr[-2000:]
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(config), "--smoke", "--out", str(tmp_path / "run")],
                         env=env, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((tmp_path / "run" / "run.json").read_text())
    assert doc["config"]["family"] == "throwaway"
    assert list(doc["stages"]) == ["sample", "finetune", "sweep", "final"]
    assert list((tmp_path / "run").glob("neon.*"))


def test_without_its_entry_point_the_family_is_unknown(tmp_path):
    config = tmp_path / "throwaway.yaml"
    config.write_text(yaml.safe_dump(_config()))
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(config), "--smoke", "--out", str(tmp_path / "run")],
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 2 and "unknown family 'throwaway'" in res.stderr
    assert res.stderr.count("\n") == 1
