"""run.json keys every stage by the inputs it reads: a rerun after an edit redoes exactly the stages that read
the edited section (and those downstream), reuses the others, says which in one line each, and ends with the
record and model card a fresh run of the edited config writes."""
import copy
import json
import re
import shutil

import pytest
from test_baselines import BASE, GuidedPix

from neon import dist
from neon.config import parse_config
from neon.errors import NeonError
from neon.run import _run

STAGES = ["sample", "finetune", "sweep", "select", "final", "baselines.self_guidance"]
CONFIG = {**copy.deepcopy(BASE), "baselines": {"self_guidance": {"omega": [0.0, 0.5]}}}


def _run_config(data: dict, out, capsys) -> list[str]:
    """neon run (smoke, in this process) of `data` into `out` -> the stage decisions it printed."""
    capsys.readouterr()
    out.mkdir(parents=True, exist_ok=True)
    _run(GuidedPix(), parse_config(data, smoke=True), str(out), True, dist.init(), "guided.yaml")
    return [line for line in capsys.readouterr().out.splitlines() if line.split(":")[0] in STAGES]


def _base_file(path, seed: int) -> str:
    family = GuidedPix()
    family.save(family.tiny(seed=seed), str(path))
    return str(path)


def _record(out) -> dict:
    """run.json as it would read in `out`, without what differs between two equal runs (timings, versions)."""
    def strip(doc):
        if isinstance(doc, dict):
            return {k: strip(v) for k, v in doc.items()
                    if not k.endswith("seconds") and k not in ("versions", "file_digests")}
        return [strip(v) for v in doc] if isinstance(doc, list) else doc
    return strip(json.loads((out / "run.json").read_text()))


def _card(out) -> str:
    return re.sub(r"\d+(\.\d+)? s\b", "T s", (out / "MODEL_CARD.md").read_text())


EDITS = {   # section edited -> (the edit, the stages it must redo; the others are reused)
    "synthetic": (lambda c: c["synthetic"].update(num_images=12), STAGES),
    "base": (None, STAGES),
    "finetune": (lambda c: c["finetune"].update(lr=2e-3), STAGES[1:]),
    "metrics": (lambda c: c["metrics"].update(kid=True, kid_subsets=2, kid_subset_size=4), STAGES[2:]),
    "sweep": (lambda c: c["sweep"].update(w=[0.0, 0.5]), STAGES[2:]),
    "final": (lambda c: c["final"].update(num_images=6), STAGES[3:]),
    "baselines": (lambda c: c["baselines"]["self_guidance"].update(omega=[0.0, 1.0]), STAGES[5:]),
}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """One finished run of CONFIG with θr read from a file: (its folder, the config)."""
    root = tmp_path_factory.mktemp("record")
    config = {**copy.deepcopy(CONFIG), "base": _base_file(root / "base.pth", seed=0)}
    _run(GuidedPix(), parse_config(config, smoke=True), str(root / "run"), True, dist.init(), "guided.yaml")
    return root / "run", config


@pytest.mark.parametrize("section", list(EDITS))
def test_an_edited_rerun_redoes_exactly_the_stages_that_read_the_edit_and_equals_a_fresh_run(
        first_run, section, tmp_path, capsys):
    out, config = first_run
    edited, (edit, redone) = copy.deepcopy(config), EDITS[section]
    rerun = tmp_path / "run"
    shutil.copytree(out, rerun)
    for path in rerun.rglob("*.json"):   # what the run recorded names its own folder
        path.write_text(path.read_text().replace(str(out), str(rerun)))
    if edit is None:   # the base checkpoint: other bytes at the same path
        original = open(config["base"], "rb").read()
        _base_file(config["base"], seed=1)
        try:
            _check_rerun(edited, rerun, tmp_path, redone, section, capsys)
        finally:
            open(config["base"], "wb").write(original)
    else:
        edit(edited)
        _check_rerun(edited, rerun, tmp_path, redone, section, capsys)


def _check_rerun(edited: dict, rerun, tmp_path, redone: list[str], section: str, capsys) -> None:
    lines = _run_config(edited, rerun, capsys)
    assert [line.split(":")[0] for line in lines] == STAGES
    for stage, line in zip(STAGES, lines):
        assert line.startswith(f"{stage}: redone (") if stage in redone else line == f"{stage}: reused", lines
    first = lines[STAGES.index(redone[0])]
    assert f"({section}" in first and "changed)" in first, first   # names what changed: 'base.sha256', 'sweep.w'

    fresh = tmp_path / "fresh"
    _run_config(edited, fresh, capsys)
    moved = json.loads(json.dumps(_record(fresh)).replace(str(fresh), str(rerun)))
    assert _record(rerun) == moved
    assert _card(rerun) == _card(fresh).replace(str(fresh), str(rerun))


def test_a_stale_stage_leaves_no_result_or_file_behind_before_anything_runs(first_run, tmp_path, capsys,
                                                                             monkeypatch):
    """The record is rewritten with the new config before the first stage runs: a run stopped right after
    (here: at the start of self-training) never pairs the edited config with the old results."""
    out, config = first_run
    rerun = tmp_path / "run"
    shutil.copytree(out, rerun)
    for path in rerun.rglob("*.json"):
        path.write_text(path.read_text().replace(str(out), str(rerun)))
    edited = copy.deepcopy(config)
    edited["finetune"]["lr"] = 5e-3
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr("neon.run.finetune", stopped)
    with pytest.raises(KeyboardInterrupt):
        _run_config(edited, rerun, capsys)
    doc = json.loads((rerun / "run.json").read_text())
    assert doc["config"]["finetune"]["lr"] == 5e-3 and list(doc["stages"]) == ["sample"]
    assert not list((rerun / "finetune").glob("snapshot-*")) and not any((rerun / "sweep").iterdir())
    assert not (rerun / "neon.pth").exists()
    assert not any((rerun / "baselines").iterdir()) and not list(rerun.glob("baselines_*.png"))


def test_a_run_folder_of_the_earlier_layout_is_refused_in_one_line(first_run, tmp_path, capsys):
    out, config = first_run
    old = tmp_path / "run"
    shutil.copytree(out, old)
    doc = json.loads((old / "run.json").read_text())
    (old / "run.json").write_text(json.dumps({k: v for k, v in doc.items() if k not in ("layout", "plan")}))
    with pytest.raises(NeonError, match="run.json: written by an earlier neon run") as e:
        _run_config(config, old, capsys)
    assert "\n" not in str(e.value)


def test_an_unrelated_folder_is_refused_as_a_run_folder(tmp_path):
    import subprocess
    import sys

    import yaml
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "synthetic.npz").write_bytes(b"my own data")
    from test_core_run import CONFIG as TINYPIX
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINYPIX))
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(tmp_path / "c.yaml"), "--smoke", "--out",
                          str(tmp_path / "mine")], capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.count("\n") == 1 and "no run.json" in res.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["synthetic.npz"]
    assert (tmp_path / "mine" / "synthetic.npz").read_bytes() == b"my own data"


def test_a_second_run_into_a_folder_in_use_is_refused_in_one_line(tmp_path):
    """One neon run per folder at a time: the first holds <out>/run.json.lock; a second refuses at once."""
    import os
    import subprocess
    import sys

    import yaml
    from test_core_run import CONFIG as TINYPIX

    from neon import paths
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(TINYPIX))
    out = tmp_path / "run"
    out.mkdir()
    with paths.output_lock(str(out / "run.json")):
        res = subprocess.run([sys.executable, "-m", "neon", "run", str(tmp_path / "c.yaml"), "--smoke", "--out",
                              str(out)], capture_output=True, text=True)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert f"in use by PID {os.getpid()}" in res.stderr
    assert sorted(p.name for p in out.iterdir()) == []


LATE_RANK = '''
import os, time
if os.environ.get("RANK") == "1":   # this rank looks at the files rank 0 writes only once rank 0 has written them
    _exists, _isfile = os.path.exists, os.path.isfile
    def _late(check):
        def late(path):
            if str(path).endswith(("neon.pth", "train_state.pt", "run.json")):
                time.sleep(2)
            return check(path)
        return late
    os.path.exists, os.path.isfile = _late(_exists), _late(_isfile)
'''


def test_a_late_rank_neither_hangs_nor_changes_the_result(tmp_path):
    """Two processes, rank 1 made late wherever it looks for a file rank 0 writes (θneon, the continued
    fine-tuning state, the record): the run finishes every stage, with the synthetic set a one-process run draws
    (training draws its noise per rank, so later stages may differ)."""
    import os
    import subprocess
    import sys

    import yaml
    from test_core_run import CONFIG as TINYPIX
    config = {**TINYPIX, "baselines": {"continued_finetune": {"real_data": None}}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(LATE_RANK)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(tmp_path / "hook") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    args = ["-m", "neon", "run", str(tmp_path / "c.yaml"), "--smoke", "--out"]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                          str(tmp_path / "two")], env=env, capture_output=True, text=True, timeout=400)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args, str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stderr[-3000:]
    moved = json.loads(json.dumps(_record(tmp_path / "two")).replace(str(tmp_path / "two"), str(tmp_path / "one")))
    single = _record(tmp_path / "one")
    assert list(moved["stages"]) == list(single["stages"]) == ["sample", "finetune", "sweep", "final", "baselines"]
    assert moved["stages"]["sample"] == single["stages"]["sample"] and moved["plan"] == single["plan"]
    assert (tmp_path / "two" / "synthetic.npz").read_bytes() == (tmp_path / "one" / "synthetic.npz").read_bytes()
