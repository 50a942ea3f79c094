"""What `--help`, `neon families` and the contributor docs tell a newcomer matches what is installed and where
things are."""
import re
from pathlib import Path

import pytest
import yaml

from conftest import DEFAULT_FIXTURES
from neon import cli
from neon.family import TEST_MODULE, available, get_family, public
from neon.launch import PREFACE

REPO = Path(__file__).resolve().parents[1]


def _subparser(command: str):
    parser = cli.build_parser(command)
    return next(a for a in parser._actions if a.dest == "command").choices[command]


def _family_help(command: str) -> str:
    return next(a for a in _subparser(command)._actions if a.dest == "family").help


@pytest.mark.parametrize("command", ["sample", "finetune", "sweep", "evaluate"])
def test_family_help_lists_every_installed_family_but_the_test_ones(command):
    listed = re.findall(r"[\w-]+", _family_help(command).split(":")[1].split("(")[0])
    assert listed == public() and "diffusers" in listed
    assert "tinypix" in available() and "tinypix" not in listed   # provided by neon.testing, for tests
    assert all(get_family(name).__module__ != TEST_MODULE for name in ("edm", "var"))


def test_neon_families_prints_every_declared_argument_with_its_default(capsys):
    cli.main(["families", "edm", "var"])
    out = capsys.readouterr().out
    blocks = dict(zip(["edm", "var"], out.split("\n\n")))
    for name, block in blocks.items():
        family = get_family(name)
        assert block.startswith(name + "\n")
        declared = family.SAMPLER_ARGS + family.LOSS_ARGS + family.LOAD_ARGS
        assert declared
        for a in declared:
            assert f"    {a.name}: " in block and f" = {a.default!r}  — {a.help}" in block, (name, a.name)
        assert f"reads: {', '.join(family.CONTAINERS)}" in block


def test_neon_families_refuses_an_unknown_name_in_one_line(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["families", "edm", "nosuch"])
    captured = capsys.readouterr()
    assert exit_.value.code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "unknown family 'nosuch'" in captured.err


def test_sample_help_points_to_neon_families_for_the_sampler_arguments():
    assert "neon families" in " ".join(_subparser("sample").format_help().split())
    assert "families" in cli.commands()


def test_torchrun_help_begins_with_what_neon_adds_to_torchrun(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["torchrun", "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert out.startswith(PREFACE + "\n\nusage: neon torchrun ") and "--nproc-per-node" in out


def test_contributing_names_the_fixture_folder_the_tests_read_by_default():
    text = (REPO / "CONTRIBUTING.md").read_text()
    old_default = "/".join(("..", "sha" + "red", "fixtures"))   # spelt apart: this file reads nothing from there
    assert f"`{DEFAULT_FIXTURES.relative_to(REPO)}/`" in text and old_default not in text


def test_setup_notes_name_every_config_that_needs_the_fashion_mnist_package():
    needs = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").glob("*.yaml")
                   if yaml.safe_load(p.read_text()).get("kind") == "fashion_mnist")
    assert len(needs) >= 2
    notes = "\n".join(line for line in (REPO / "scripts" / "setup.sh").read_text().splitlines()
                      if "note " in line or line.strip().startswith('"'))
    for config in needs:
        assert notes.count(config) == 2, config   # both notes: no apt-get, and a failed install


def test_progress_bars_written_to_a_log_redraw_every_30_s():
    """The program (not an in-process call, which must leave the caller's environment alone) sets tqdm's pace
    when its stderr is no terminal, and keeps a user's own choice."""
    import os
    import subprocess
    import sys
    code = "import os, sys\nfrom neon import cli\nsys.argv = ['neon', 'families']\ncli.main()\n" \
           "print(os.environ.get('TQDM_MININTERVAL'))"
    env = {k: v for k, v in os.environ.items() if k != "TQDM_MININTERVAL"}
    run = lambda env: subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                     check=True).stdout.strip().splitlines()[-1]
    assert run(env) == "30"
    assert run({**env, "TQDM_MININTERVAL": "2"}) == "2"
    before = os.environ.get("TQDM_MININTERVAL")
    cli.main(["families"])
    assert os.environ.get("TQDM_MININTERVAL") == before
