"""toy_appendix.ipynb runs top to bottom (quick mode) in a kernel of this very Python."""
import json
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec that starts `sys.executable -m ipykernel_launcher`, so the notebook sees this environment's
    `neon` whatever `python` is on PATH and whatever kernels are installed elsewhere."""
    name = "neon-toy-test"
    spec = tmp_path / "jupyter" / "kernels" / name
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": name, "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return name


def test_toy_appendix_notebook_runs_in_quick_mode(tmp_path, monkeypatch, kernel_name):
    out = tmp_path / "out"
    monkeypatch.delenv("NEON_TOY_QUICK", raising=False)   # quick is the notebook's own default
    monkeypatch.setenv("NEON_TOY_OUT", str(out))
    nb = nbformat.read(REPO / "toy_appendix.ipynb", as_version=4)
    NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(REPO)}}).execute()

    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 3        # the three figures, inline
    assert any("best w" in o.get("text", "") for o in outputs)                # the table
    assert json.loads((out / "toy_results.json").read_text())["quick"] is True


def test_python_dash_m_neon_toy_is_the_toy_command():
    help_text = subprocess.run([sys.executable, "-m", "experiments.toy", "--help"], capture_output=True, text=True,
                               check=True).stdout
    assert "--quick" in help_text and "--out" in help_text and "--seed" in help_text


def test_the_committed_notebook_carries_no_outputs_and_the_venv_can_open_it():
    nb = nbformat.read(REPO / "toy_appendix.ipynb", as_version=4)
    assert all(not cell.outputs and cell.execution_count is None for cell in nb.cells if cell.cell_type == "code")
    import tomllib
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"jupyterlab", "nbconvert", "ipykernel"} <= {d.split(">")[0].split("=")[0] for d in extras["notebook"]}
