"""bench/device_check.sh runs its CPU-runnable part: every variant of a family on tiny networks, with rows that
say how far each fast path is from eager."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_quick_device_check_runs_every_variant_on_cpu(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DEVICE_CHECK_OUT": str(tmp_path)}
    res = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--device", "cpu", "--quick",
                          "--families", "var", "imm"], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads((tmp_path / "device_check.json").read_text())
    variants = {(r["family"], r["variant"]) for r in rows}
    assert variants == {("var", "eager fp32"), ("var", "official precision"), ("imm", "eager fp32"),
                        ("imm", "official precision"), ("imm", "compiled fp32"), ("imm", "compiled official")}
    for r in rows:
        assert r["images_per_s"] > 0 and r["max_abs_uint8"] <= 1, r   # CPU: fp16 autocast is CUDA-only
    assert "failed: none" in (tmp_path / "device_check.log").read_text()


def _fresh_machine(tmp_path) -> dict:
    """The environment of a bare device machine: `python3` on PATH and no `python`, the repository's packages not
    installed (importable only from sys.path) and no diffusers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    prelude = tmp_path / "prelude.py"
    prelude.write_text(textwrap.dedent("""
        import importlib.machinery
        import runpy
        import sys

        class NotInstalled:
            PACKAGES = {"neon", "edm", "var", "xar", "imm", "hf_diffusers", "experiments"}

            def find_spec(self, name, path=None, target=None):
                if name == "diffusers":
                    raise ModuleNotFoundError(name)
                if name in self.PACKAGES:
                    return importlib.machinery.PathFinder.find_spec(name, sys.path) or self.missing(name)

            def missing(self, name):
                raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NotInstalled())
        sys.modules["diffusers"] = None
        sys.argv = sys.argv[1:]
        runpy.run_path(sys.argv[0], run_name="__main__")
    """))
    (bin_dir / "python3").write_text(f'#!/bin/sh\nexec "{sys.executable}" "{prelude}" "$@"\n')
    (bin_dir / "python3").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    return {**env, "PATH": f"{bin_dir}:/usr/bin:/bin", "OMP_NUM_THREADS": "1", "DEVICE_CHECK_OUT": str(tmp_path)}


def test_device_check_runs_from_a_plain_copy_with_python3_only_and_skips_imm_without_diffusers(tmp_path):
    res = subprocess.run(["bash", str(REPO / "bench" / "device_check.sh"), "--device", "cpu", "--quick",
                          "--families", "var", "imm"], env=_fresh_machine(tmp_path), cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "imm: skipped: needs diffusers" in res.stdout
    rows = json.loads((tmp_path / "device_check.json").read_text())
    assert {(r["family"], r["variant"]) for r in rows} == {("var", "eager fp32"), ("var", "official precision")}
