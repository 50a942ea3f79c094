"""scripts/setup.sh on a fresh machine, with every outside program replaced by a stub that records its call.

Root installs the optional Fashion-MNIST package with apt-get itself; a normal user goes through sudo; without
sudo (or when the install fails) the script notes it and carries on. The venv and pip steps run either way,
with the torch pins of pyproject.toml.
"""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = ("bash", "grep", "dirname", "cat")   # the real programs the script may use besides the stubs


def stub(folder: Path, name: str, body: str = "") -> None:
    path = folder / name
    path.write_text(f'#!/bin/bash\necho "{name} $*" >> "$CALLS"\n{body}\n')
    path.chmod(0o755)


@pytest.fixture
def machine(tmp_path):
    """A checkout holding only scripts/setup.sh and an existing .venv whose python records its calls, and a
    PATH of stubs (id, dpkg-query, apt-get) plus the few real tools; no sudo unless a test adds one."""
    checkout = tmp_path / "checkout"
    (checkout / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", checkout / "scripts" / "setup.sh")
    (checkout / ".venv" / "bin").mkdir(parents=True)
    stub(checkout / ".venv" / "bin", "python")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    for tool in TOOLS:
        (bin_ / tool).symlink_to(shutil.which(tool))
    stub(bin_, "dpkg-query", "exit 1")   # nothing installed
    stub(bin_, "apt-get")
    calls = tmp_path / "calls"
    calls.touch()

    def run(uid: int, sudo: bool = False, apt_fails: bool = False) -> tuple[list[str], str]:
        stub(bin_, "id", f"echo {uid}")
        if apt_fails:
            stub(bin_, "apt-get", "exit 100")
        if sudo:
            stub(bin_, "sudo", '"$@"')
        env = {"PATH": str(bin_), "CALLS": str(calls), "HOME": str(tmp_path)}
        res = subprocess.run(["bash", str(checkout / "scripts" / "setup.sh")], env=env, capture_output=True,
                             text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        return calls.read_text().splitlines(), res.stderr

    return run


def pip_calls(calls: list[str]) -> list[str]:
    return [c for c in calls if c.startswith("python -m pip")]


def test_root_installs_the_package_with_apt_get_and_never_sudo(machine):
    calls, _ = machine(uid=0)
    apt = [c for c in calls if c.startswith(("apt-get", "sudo"))]
    assert apt == ["apt-get install -y dataset-fashion-mnist"]


def test_a_user_installs_the_package_through_sudo(machine):
    calls, _ = machine(uid=1000, sudo=True)
    assert "sudo apt-get install -y dataset-fashion-mnist" in calls
    assert all(c.startswith(("sudo apt-get", "apt-get", "id", "dpkg-query", "python")) for c in calls), calls


@pytest.mark.parametrize("case", [dict(uid=1000), dict(uid=0, apt_fails=True)], ids=["no-sudo", "apt-fails"])
def test_without_a_way_to_install_the_package_it_notes_and_sets_up_the_rest(machine, case):
    calls, stderr = machine(**case)
    assert "dataset-fashion-mnist" in stderr and "without it" in stderr
    assert len(pip_calls(calls)) == 2


def test_pip_installs_the_pinned_torch_then_the_project_with_its_test_extras(machine):
    first, second = pip_calls(machine(uid=0)[0])
    pins = re.findall(r"torch(?:vision)?==[\d.]+", first)
    pyproject = (REPO / "pyproject.toml").read_text()
    assert sorted(pins) == sorted(re.findall(r'"(torch(?:vision)?==[\d.]+)"', pyproject))
    assert second.endswith("install --quiet -e .[test]")
