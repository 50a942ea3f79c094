"""The VAR run configs validate, and every argument in them is one the VAR family accepts."""
from __future__ import annotations

import inspect

import pytest

from conftest import REPO
from neon.config import load_config
from var.adapter import LOSS_ARGS, VARFamily

CONFIGS = ["configs/var_d16_256.yaml", "configs/var_d36_512.yaml"]


@pytest.mark.parametrize("path", CONFIGS)
@pytest.mark.parametrize("smoke", [False, True])
def test_config_validates_and_fits_the_family(path, smoke):
    cfg = load_config(str(REPO / path), smoke=smoke)
    assert cfg.family == "var"
    fam = VARFamily()
    sample_args = set(inspect.signature(fam.sample).parameters) - {"bundle", "seeds", "labels"}
    for section in (cfg.synthetic, cfg.sweep, cfg.final):
        assert set(section.sampler) <= sample_args, section
    assert cfg.sweep.cfg_key in sample_args
    assert set(cfg.finetune.loss_args) <= set(LOSS_ARGS)
    assert set(cfg.load_args) <= set(inspect.signature(fam.load).parameters)
    assert set(cfg.finetune.optimizer) <= {"optimizer", "betas", "eps", "weight_decay", "grad_clip", "autocast"}
    if smoke:
        assert cfg.base is None
        assert cfg.synthetic.per_class * 10 <= 64 and cfg.final.num_images <= 64
    else:
        assert cfg.base and cfg.ref_stats and cfg.load_args["vae_path"]
