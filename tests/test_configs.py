"""Every config in configs/ validates, and `neon run CONFIG --smoke` runs all its stages on CPU."""
import dataclasses
import importlib.metadata
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from neon.config import METHOD_KIND, ConfigError, config_kind, load_config, parse_config
from neon.family import TrainDefaults, arg_names, get_family

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (REPO / "configs").glob("*.yaml"))
PAPER_ROWS = [c for c in CONFIGS if config_kind(str(c)) == METHOD_KIND]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
INSTALLED_FAMILIES = sorted(ep.name for ep in importlib.metadata.entry_points(group="neon.families"))


def test_there_is_one_config_per_paper_row():
    names = {c.stem for c in PAPER_ROWS}
    assert {"edm_cifar10_cond", "edm_cifar10_uncond", "edm_ffhq64", "var_d16_256", "var_d36_512", "xar_b_256",
            "xar_l_256", "imm_in256"} <= names


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_config_validates_as_is_and_with_smoke(config):
    cfg = load_config(str(config))
    assert cfg.base and cfg.ref_stats, "a paper row names its base checkpoint and reference statistics"
    smoke = load_config(str(config), smoke=True)
    assert smoke.base is None


def _smoke_images(section, num_classes: int) -> int:
    return section.num_images if section.per_class is None else section.per_class * num_classes


def _load_arg_checks() -> dict:
    """What a paper row of each family must name besides its checkpoint (the official files it needs)."""
    from xar.model import CONFIGS as XAR_SIZES
    return {"var": lambda a: a.get("vae_path"), "xar": lambda a: a.get("vae_path") and a.get("model") in XAR_SIZES,
            "imm": lambda a: a.get("vae_path")}


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
@pytest.mark.parametrize("smoke", [False, True], ids=["full", "smoke"])
def test_every_argument_of_a_config_is_one_its_family_declares(config, smoke):
    cfg = load_config(str(config), smoke=smoke)        # refuses undeclared arguments; the same rule spelled out:
    family = get_family(cfg.family)
    sampler = set(arg_names(family.SAMPLER_ARGS))
    for section in (cfg.synthetic, cfg.sweep, cfg.final):
        assert set(section.sampler) <= sampler, section
    assert set(cfg.sweep.grid) <= sampler
    assert cfg.sweep.cfg is None or cfg.sweep.cfg_key in sampler
    assert set(cfg.finetune.loss_args) <= set(arg_names(family.LOSS_ARGS))
    assert set(cfg.finetune.optimizer) <= {f.name for f in dataclasses.fields(TrainDefaults)}
    if smoke:
        assert cfg.base is None and cfg.ref_stats is None
        assert set(cfg.load_args) <= set(arg_names(family.LOAD_ARGS + family.TINY_ARGS))
        tiny = family.tiny(**cfg.load_args)             # the smoke counts are CPU-sized (a few dozen images)
        for section in (cfg.synthetic, cfg.sweep, cfg.final):
            assert _smoke_images(section, tiny.num_classes) <= 64, section
        assert cfg.finetune.total_images <= 64
    else:
        assert set(cfg.load_args) <= set(arg_names(family.LOAD_ARGS))
        assert _load_arg_checks().get(cfg.family, lambda a: True)(cfg.load_args), cfg.load_args


def _keywords(fn, positional: int) -> tuple[set[str], bool]:
    """The keyword parameters of a method after its first `positional` ones, and whether it takes **kwargs."""
    params = list(inspect.signature(fn).parameters.values())[positional:]
    return ({p.name for p in params if p.kind is not p.VAR_KEYWORD},
            any(p.kind is p.VAR_KEYWORD for p in params))


@pytest.mark.parametrize("name", INSTALLED_FAMILIES)
def test_declared_arguments_are_the_methods_keywords(name):
    """What a family declares is what its methods take: nothing declared is refused by the method, nothing the
    method takes by name is missing from the declaration (a **kwargs method passes its keywords on)."""
    family = get_family(name)
    for fn, positional, declared in ((family.sample, 3, family.SAMPLER_ARGS), (family.loss, 2, family.LOSS_ARGS),
                                     (family.load, 2, family.LOAD_ARGS),
                                     (family.tiny, 2, family.LOAD_ARGS + family.TINY_ARGS)):
        named, takes_more = _keywords(fn, positional)
        if fn.__name__ == "sample":
            named -= {"batch_invariant"}  # the core's own keyword (neon.sampling.draw_batch), not a sampler argument
        assert named <= set(arg_names(declared)), (fn.__name__, named)
        assert takes_more or set(arg_names(declared)) <= named, (fn.__name__, declared)


def test_bad_fields_are_named_in_one_line(tmp_path):
    cases = [({"family": "edm", "finetune": {"lr": "fast"}}, r"finetune\.lr: expected a number"),
             ({"family": "edm", "sweep": {"ww": [0]}}, r"sweep\.ww: unknown field"),
             ({"synthetic": {"num_images": 4}}, r"family: required field is missing"),
             ({"family": "edm", "synthetic": {"num_images": 4, "labels": "some"}}, r"synthetic\.labels"),
             ({"family": "edm", "finetune": {"ema": {"decay": 0.9}}}, r"finetune\.ema")]
    for data, message in cases:
        data.setdefault("synthetic", {"num_images": 4})
        with pytest.raises(ConfigError, match=message) as info:
            parse_config(data)
        assert "\n" not in str(info.value)
    (tmp_path / "bad.yaml").write_text("family: edm\nsweep: {w: [0, 1}\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))
    assert parse_config({"family": "x", "synthetic": {"num_images": 2}, "finetune": {"lr": "1e-5"}}).finetune.lr == 1e-5


@pytest.mark.parametrize("config", PAPER_ROWS, ids=lambda p: p.stem)
def test_smoke_run_goes_through_every_stage(config, tmp_path):
    out = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "neon", "run", str(config), "--smoke", "--out", str(out)],
                         env=ENV, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    doc = json.loads((out / "run.json").read_text())
    assert set(doc["stages"]) == {"sample", "finetune", "sweep", "final"} and doc["smoke"] is True
    assert doc["stages"]["final"]["neon"]["fid"] is not None
    for name in ("synthetic.npz", "sweep.json", "sweep.png"):
        assert (out / name).is_file(), name
    assert list(out.glob("neon.*")) and list((out / "finetune").glob("snapshot-*"))
